"""RLOO: the grpo stage's sampling and rewards with a leave-one-out objective (``stage.py``)."""
