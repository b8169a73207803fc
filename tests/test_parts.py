"""What trains: freezing by part, per-part learning rates, the trainable-parameter table."""

from __future__ import annotations

import pytest

from mmpost.config.schema import TrainConfig
from mmpost.training.trainable import PartError, apply_trainable, param_groups


def lr_of(groups, param):
    return next(g["lr"] for g in groups if any(p is param for p in g["params"]))


def test_per_part_learning_rates_most_specific_wins(make_model):
    model = make_model()
    table = apply_trainable(model, ["connectors", "llm", "encoders"])
    assert "connectors.image" in table and "llm" in table
    train = TrainConfig(lr=1e-4, weight_decay=0.1, part_lr={"connectors": 1e-3, "connectors.image": 2e-4, "llm": 1e-5})
    groups = param_groups(model, train, ["connectors", "llm", "encoders"])
    connector_weight = model.connectors["image"].layers[0].weight
    assert lr_of(groups, connector_weight) == 2e-4
    assert lr_of(groups, next(model.llm.parameters())) == 1e-5
    assert lr_of(groups, next(model.encoders["image"].parameters())) == 1e-4  # falls back to train.lr
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay[id(connector_weight)] == 0.1 and decay[id(model.connectors["image"].layers[0].bias)] == 0.0


def test_freezing_selects_exactly_the_named_parts(make_model):
    model = make_model()
    apply_trainable(model, ["connectors"])
    assert all(p.requires_grad for p in model.connectors.parameters())
    assert not any(p.requires_grad for p in model.llm.parameters())
    assert not any(p.requires_grad for p in model.encoders.parameters())
    with pytest.raises(PartError, match="no LoRA adapters"):
        apply_trainable(model, ["llm.lora"])
    with pytest.raises(PartError, match="unknown part 'decoder'"):
        apply_trainable(model, ["decoder"])
