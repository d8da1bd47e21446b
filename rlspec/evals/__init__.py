"""Evaluation: held-out pass@1 and token statistics."""
