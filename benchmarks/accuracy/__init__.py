"""The accuracy benchmark: train -> prune -> fine-tune on generated data (see run.py)."""
