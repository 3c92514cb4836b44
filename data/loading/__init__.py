"""Shards -> batches: the shard list and reader (local or remote), sample decoding, epoch shares and streams,
batching and packing, and the resumable loader."""
