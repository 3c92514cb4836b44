"""Commands built on the library: the demo corpus, a custom voice's shards, the loader bench, showing a sample."""
