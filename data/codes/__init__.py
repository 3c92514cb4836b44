"""Audio codes: the audio tokenizers (k-means, CosyVoice 2 S3) and `python -m data.codes` (fit, and codes into
shards)."""
