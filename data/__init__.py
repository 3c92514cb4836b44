"""Data layer: audio I/O and features, shards, tokenizers, task templates and loaders."""
