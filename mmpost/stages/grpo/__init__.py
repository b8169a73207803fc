"""GRPO: the stage (``stage.py``) and its rollouts (``rollout.py``)."""
