"""GRPO: the stage (``stage.py``), its rollouts (``rollout.py``) and its advantages and loss (``objective.py``)."""
