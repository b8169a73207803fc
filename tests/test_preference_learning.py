"""Opt-in (``-m slow``, a few minutes): from the demo's sft model, kto and orpo lift held-out preference accuracy
(the implicit reward of the chosen answer above the rejected one's, on the held-out pairs) to at least 0.85, with
the demo's dpo recipe (configs/demo/dpo.yaml) and only the loss type (and kto's data) changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmpost.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "loss_type, beta, train_file",
    [("kto", 0.1, "unpaired.json"), ("orpo", 0.5, "pairs.json")],
)
def test_the_preference_is_learnt_from_the_demo_sft_model(demo_sft, tmp_path, loss_type, beta, train_file):
    demo = demo_sft
    data = demo / "data"
    overrides = [
        f"stage.loss_type={loss_type}",
        f"stage.beta={beta}",
        f"out={tmp_path / loss_type}",
        f"from={demo / 'runs' / 'sft'}",
        f"data.train.path={data / train_file}",
        f"data.train.image_root={data / 'images'}",
        f"data.eval.path={data / 'pairs_heldout.jsonl'}",
        f"data.eval.image_root={data / 'images'}",
    ]
    assert main(["train", str(ROOT / "configs" / "demo" / "dpo.yaml"), "--set", *overrides]) == 0
    summary = json.loads((tmp_path / loss_type / "summary.json").read_text())
    before = summary["eval_before"]["eval/preference_accuracy"]
    after = summary["eval_after"]["eval/preference_accuracy"]
    print({"loss_type": loss_type, "before": before, "after": after})
    assert after >= 0.85 and after > before
