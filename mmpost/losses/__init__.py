"""Losses as pure functions of tensors, each tested against hand-worked numbers."""
