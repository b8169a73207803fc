"""Reward modelling: a scalar reward head trained on preference pairs with the Bradley–Terry loss (``stage.py``)."""
