"""Trainers and the pure algorithm functions they use (advantages, losses)."""
