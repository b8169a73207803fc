"""``mmpost plan`` sizes the LLaVA-1.5 recipes offline from their shapes (config.json only, no weights)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmpost.cli import main
from mmpost.config import load_config
from mmpost.plan import GiB, plan

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "configs" / "llava" / "shapes"


def llava(recipe: str, size: str, *extra: str):
    tower = f"{{name: hf_vision, path: {SHAPES / 'clip-vit-large-patch14-336'}, feature_layer: -2}}"
    overrides = [
        "from=null",
        f"model.llm.path={SHAPES / f'vicuna-{size}-v1.5'}",
        f"model.encoders.image={tower}",
        "model.connectors.image={name: mlp, depth: 2}",
        *extra,
    ]
    return load_config(ROOT / "configs" / "llava" / f"{recipe}.yaml", overrides)


def test_the_7b_recipe_counts_its_parameters_and_shards_them():
    ddp, fsdp2 = plan(llava("sft", "7b"), 8, "ddp"), plan(llava("sft", "7b"), 8, "fsdp2")
    # Vicuna-7B 6.74 B + CLIP ViT-L/14-336 0.30 B + projector 0.02 B, float32 master weights
    assert ddp["parameters"] / 4 == pytest.approx(6.738e9 + 0.3035e9 + 0.0210e9, rel=1e-3)
    assert fsdp2["parameters"] == pytest.approx(ddp["parameters"] / 8)
    assert fsdp2["optimizer_state"] < ddp["optimizer_state"] / 7
    assert ddp["total"] > 80 * GiB > fsdp2["total"]  # the recipe needs sharding on 80 GB cards


def test_a_lora_dpo_reference_is_the_policy_and_a_full_one_is_a_copy():
    lora = plan(llava("dpo", "7b"), 8, "fsdp2")
    full = plan(llava("dpo", "7b", "model.lora.r=0", "train.trainable=[llm]"), 8, "fsdp2")
    assert lora["reference_or_teacher"] == 0 and full["reference_or_teacher"] == pytest.approx(full["parameters"])
    assert lora["gradients"] < full["gradients"] / 20


def test_the_command_prints_the_plan(capsys):
    tower = f"{{name: hf_vision, path: {SHAPES / 'clip-vit-large-patch14-336'}, feature_layer: -2}}"
    argv = [
        "plan",
        str(ROOT / "configs" / "llava" / "sft.yaml"),
        "--gpus",
        "8",
        "--sharding",
        "zero3",
        "--set",
        "from=null",
        f"model.llm.path={SHAPES / 'vicuna-13b-v1.5'}",
        f"model.encoders.image={tower}",
        "model.connectors.image={name: mlp, depth: 2}",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "sharding zero3" in out and "optimizer_state" in out and "GiB" in out
