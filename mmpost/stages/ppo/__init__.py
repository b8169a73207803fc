"""PPO: RLHF with a value head and a reward model (``stage.py``)."""
