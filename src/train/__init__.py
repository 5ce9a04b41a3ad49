"""The training loop (loop.py), its gradient accumulation plans, and the per-epoch logger."""
