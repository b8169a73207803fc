"""Plumbing shared by every stage, as plain functions: accelerator, parts and optimizer, checkpoints,
metrics, evaluation. The loop itself is ``mmpost.training.loop``."""
