"""The training stage: optimizer, steps, checkpoints, metrics and the loop."""
