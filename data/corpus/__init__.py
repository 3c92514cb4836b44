"""Corpus -> shards: the readers of each corpus format, the conversation and preference records, the
`python -m data.corpus.prepare` command, and shard statistics."""
