"""The Step-Audio 2 model: encoder, adapter, Qwen2 decoder, config, checkpoints, generation."""
