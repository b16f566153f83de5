"""Adapter files: PEFT's format (one process) and per-rank sharded checkpoints."""
