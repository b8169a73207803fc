"""The demo (quick smoke run by default; the full demo is an opt-in benchmark) and CLI commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForImageTextToText

from mmpost.cli import main


def test_quick_demo_runs_the_whole_chain(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["stages"]) == {"align", "sft"}
    for stage in ("align", "sft"):
        s = summary["stages"][stage]
        assert s["steps"] > 0 and 0.0 <= s["heldout_accuracy"] <= 1.0 and (out / "runs" / stage / "final").is_dir()
    assert AutoModelForImageTextToText.from_pretrained(summary["export"]).config.model_type == "llava"
    assert "exported (transformers LLaVA layout, verified)" in capsys.readouterr().out
    assert main(["demo", "--out", str(out), "--quick"]) == 2  # not empty
    image = next((out / "data" / "images" / "heldout").glob("*.png"))
    assert main(["generate", str(out / "runs" / "sft"), "--image", str(image), "--prompt", "What shape?"]) == 0


@pytest.mark.slow
def test_full_demo_reaches_090_heldout_accuracy(tmp_path):
    """The README's demo: about 3 minutes on 2 CPU cores (pytest -m slow)."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["sft"]["heldout_accuracy"] >= 0.90


def test_data_synth_and_config_commands(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--train", "12", "--heldout", "6"]) == 0
    assert (tmp_path / "d" / "sft.json").is_file() and list((tmp_path / "d" / "shards").glob("*.tar"))
    assert main(["config", "keys"]) == 0
    keys = capsys.readouterr().out
    assert "train.part_lr" in keys and "encoder 'timm'" in keys and "connector 'mlp'" in keys
    cfg = Path(__file__).resolve().parents[1] / "configs" / "demo" / "sft.yaml"
    assert main(["config", "show", str(cfg), "--set", "train.lr=2e-4"]) == 0
    assert "lr: 0.0002" in capsys.readouterr().out


def test_cli_reports_user_errors_in_one_line(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("stage: sft\ntrain: {lr: fast}\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmpost: error:") and "train.lr: expected a number, got 'fast'" in err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "--prompt", "hi"]) == 2
    assert "is not a run directory" in capsys.readouterr().err
