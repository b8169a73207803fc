"""Opt-in (``-m slow``, a few minutes): kto and orpo lift held-out preference accuracy (the implicit reward of the
chosen answer above the rejected one's, on the held-out pairs) to at least 0.85, with the demo's dpo recipe
(configs/demo/dpo.yaml) and only the loss type (and kto's data) changed. They start from the demo's ``sft_short``
(the sft config stopped after 60 steps), as grpo does: the full sft model already ranks 0.99 of the held-out pairs
by ORPO's reference-free reward, which would leave nothing to show."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmpost.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sft_short(demo_sft, tmp_path_factory) -> Path:
    from mmpost.demo import stage_overrides

    out = tmp_path_factory.mktemp("sft_short") / "run"
    overrides = [*stage_overrides(demo_sft, "sft_short"), f"out={out}"]
    assert main(["train", str(ROOT / "configs" / "demo" / "sft.yaml"), "--set", *overrides]) == 0
    return out


@pytest.mark.parametrize(
    "loss_type, beta, train_file",
    [("kto", 0.1, "unpaired.json"), ("orpo", 0.5, "pairs.json")],
)
def test_the_preference_is_learnt_from_a_short_sft_run(demo_sft, sft_short, tmp_path, loss_type, beta, train_file):
    demo = demo_sft
    data = demo / "data"
    overrides = [
        f"stage.loss_type={loss_type}",
        f"stage.beta={beta}",
        f"out={tmp_path / loss_type}",
        f"from={sft_short}",
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
