"""Model references, checkpoints, LoRA adapters and architecture facts."""
