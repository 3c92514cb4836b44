"""Training: config schema, the DeepSpeed engine seam, the step loop, checkpoints, metrics."""
