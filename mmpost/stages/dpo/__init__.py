"""Preference optimisation: the stage (``stage.py``) and its pairs' loss and held-out evaluation (``pairs.py``)."""
