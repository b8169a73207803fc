"""Config-launched runs on tiny models: run directory contents, falling loss, stage chaining, exact
resume, skipped samples, and the errors a user gets for bad runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import webdataset as wds
import yaml

import mmpost
import mmpost.training.loop
from mmpost.cli import main
from mmpost.training.metrics import read_metrics


def train_lines(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if "loss" in r]


def test_align_run_writes_a_complete_run_directory(run_config, tmp_path):
    cfg = run_config("align", train={"max_steps": 12, "save_every": 4, "keep_checkpoints": 2, "lr": 1e-2})
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "align"
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["max_steps"] == 12 and resolved["train"]["batch_size"] == 8  # defaults filled in
    lines = train_lines(run)
    assert [r["step"] for r in lines] == list(range(1, 13))
    assert all({"step", "loss", "lr"} <= set(r) for r in lines)
    first, last = sum(r["loss"] for r in lines[:3]) / 3, sum(r["loss"] for r in lines[-3:]) / 3
    # A frozen random tiny LLM has near-uniform logits (ln V ~ 6.2), so the connector alone moves the loss
    # by a tenth or so in 12 steps; the noise between batches is far smaller than that.
    assert last < first - 0.05, (first, last)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-4", "step-8"]  # step-12 is final/
    assert (run / "checkpoints" / "step-8" / "config.yaml").is_file()
    assert mmpost.load(run / "checkpoints" / "step-8" / "model").modalities == ["image"]
    evals = [r for r in read_metrics(run) if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 12] and evals[1]["eval/loss"] < evals[0]["eval/loss"] - 0.02
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 12 and Path(summary["final"]) == run / "final"
    assert list((run / "tb").iterdir())  # TensorBoard events


def test_sft_starts_from_an_align_run_and_trains_the_llm(run_config, tmp_path, synth_dir):
    assert main(["train", str(run_config("align", train={"max_steps": 2}))]) == 0
    align = mmpost.load(tmp_path / "align" / "final")
    sft_data = {"path": str(synth_dir / "sft.json"), "image_root": str(synth_dir / "images")}
    cfg = run_config("sft", stage="sft", data={"train": sft_data})
    data = yaml.safe_load(cfg.read_text())
    data["from"], data["model"] = str(tmp_path / "align"), {}  # the model comes from the align run
    cfg.write_text(yaml.safe_dump(data))
    assert main(["train", str(cfg)]) == 0
    sft = mmpost.load(tmp_path / "sft" / "final")
    frozen_encoder = all(
        (a == b).all()
        for a, b in zip(align.encoders.state_dict().values(), sft.encoders.state_dict().values(), strict=True)
    )
    changed_llm = any(
        (a != b).any() for a, b in zip(align.llm.state_dict().values(), sft.llm.state_dict().values(), strict=True)
    )
    assert frozen_encoder and changed_llm


@pytest.mark.parametrize("variant", ["align", "sft_lora"])
def test_resume_continues_the_same_loss_curve(run_config, tmp_path, monkeypatch, synth_dir, variant):
    # 96 samples / batch 8 = 12 batches an epoch: the interrupted run resumes at 10 and crosses an epoch.
    common = {"max_steps": 16, "save_every": 5, "warmup_ratio": 0.2}
    extra = {}
    if variant == "sft_lora":  # LoRA adapters with dropout: resume restores adapters, optimizer and RNG
        sft = {"path": str(synth_dir / "sft.json"), "image_root": str(synth_dir / "images")}
        lora = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
        extra = {"stage": "sft", "data": {"train": sft}, "model": {"lora": lora}}
    assert main(["train", str(run_config("straight", train=common, **extra))]) == 0
    original = mmpost.training.loop.save_checkpoint

    def crash_after_step_10(*args, **kwargs):
        path = original(*args, **kwargs)
        if path.name == "step-10":
            raise KeyboardInterrupt("simulated crash")
        return path

    cfg = run_config("interrupted", train=common, **extra)
    monkeypatch.setattr(mmpost.training.loop, "save_checkpoint", crash_after_step_10)
    with pytest.raises(KeyboardInterrupt):
        main(["train", str(cfg)])
    monkeypatch.setattr(mmpost.training.loop, "save_checkpoint", original)
    assert main(["train", str(cfg), "--resume"]) == 0
    straight = [(r["step"], r["loss"], r["lr"]) for r in train_lines(tmp_path / "straight")]
    resumed = [(r["step"], r["loss"], r["lr"]) for r in train_lines(tmp_path / "interrupted")]
    assert resumed == straight  # exactly equal on CPU, step for step
    if variant == "sft_lora":
        assert mmpost.load(tmp_path / "interrupted" / "final").has_lora


def test_bf16_mixed_precision_trains(run_config, tmp_path):
    assert main(["train", str(run_config("bf16", train={"precision": "bf16", "max_steps": 4}))]) == 0
    losses = [r["loss"] for r in train_lines(tmp_path / "bf16")]
    assert len(losses) == 4 and all(0 < x < 10 for x in losses)


def shard_with_corrupt_images(path: Path, synth_dir: Path, n: int, corrupt: set[int]) -> Path:
    records = json.loads((synth_dir / "align.json").read_text())[:n]
    with wds.TarWriter(str(path)) as sink:
        for i, record in enumerate(records):
            png = (synth_dir / "images" / record["image"]).read_bytes()
            sink.write(
                {
                    "__key__": f"s{i:04d}",
                    "png": b"\x89PNG not really" if i in corrupt else png,
                    "json": json.dumps({**record, "image": "png"}).encode(),
                }
            )
    return path


def test_corrupt_images_are_skipped_counted_and_bounded(run_config, tmp_path, synth_dir, capsys):
    shard = shard_with_corrupt_images(tmp_path / "data.tar", synth_dir, 80, corrupt={3, 17, 40})
    ok = run_config("tolerant", data={"train": {"path": str(shard)}, "max_bad_fraction": 0.1})
    assert main(["train", str(ok), "--set", "train.max_steps=8"]) == 0
    last = train_lines(tmp_path / "tolerant")[-1]
    assert last["data/skipped"] == 3
    assert json.loads((tmp_path / "tolerant" / "summary.json").read_text())["samples_skipped"] == 3
    assert "cannot decode image" in (tmp_path / "tolerant" / "train.log").read_text()
    strict = run_config("strict", data={"train": {"path": str(shard)}, "max_bad_fraction": 0.01})
    assert main(["train", str(strict), "--set", "train.max_steps=8"]) == 2
    err = capsys.readouterr().err
    assert "3 of 56 samples skipped so far, more than data.max_bad_fraction=0.01" in err


def test_sequences_whose_media_do_not_fit_are_dropped_and_counted(run_config, capsys):
    cfg = run_config("short", data={"max_length": 12})
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "samples skipped so far" in err and "media tokens end at" in err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.train.path=/nonexistent/train.json"], "/nonexistent/train.json"),
        (["from=/tmp"], "from: /tmp is not a run directory"),
        (["train.trainable=[connector]"], "unknown part 'connector'; valid: connectors"),
        (["train.part_lr={projector: 1e-3}"], "train.part_lr: unknown part 'projector'"),
        (["model.encoders.image.path=/nonexistent/clip"], "/nonexistent/clip"),
        (["train.lr=1e30", "train.max_grad_norm=0"], "lower train.lr, check the data"),
    ],
)
def test_bad_runs_fail_with_a_message_naming_the_problem(run_config, capsys, overrides, message):
    cfg = run_config("bad")
    if overrides[0].startswith("from="):
        overrides = [*overrides, "model.llm.path=", "model.encoders={}", "model.connectors={}"]
    assert main(["train", str(cfg), "--set", *overrides]) == 2
    assert message in capsys.readouterr().err


def test_a_non_empty_run_directory_needs_resume(run_config, tmp_path, capsys):
    cfg = run_config("twice", train={"max_steps": 1})
    assert main(["train", str(cfg)]) == 0
    assert main(["train", str(cfg)]) == 2
    assert "is not empty: pass --resume" in capsys.readouterr().err


def train_on_edited_captions(run_config, tmp_path, synth_dir, capsys, edit) -> tuple[int, str, dict]:
    """Trains on the first 10 captions after ``edit(records)`` breaks one; returns (exit code, stderr, records)."""
    records = json.loads((synth_dir / "align.json").read_text())[:10]
    edit(records)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    cfg = run_config("broken", data={"train": {"path": str(bad), "image_root": str(synth_dir / "images")}})
    return main(["train", str(cfg)]), capsys.readouterr().err, records


def test_missing_image_names_the_sample(run_config, tmp_path, synth_dir, capsys):
    def edit(records):
        records[4]["image"] = "train/missing.png"

    code, err, records = train_on_edited_captions(run_config, tmp_path, synth_dir, capsys, edit)
    assert code == 2
    assert records[4]["id"] in err and "missing.png" in err


def test_placeholder_mismatch_names_the_sample(run_config, tmp_path, synth_dir, capsys):
    def edit(records):
        records[2]["conversations"][0]["value"] = "<image>\n<image>\nDescribe."

    code, err, records = train_on_edited_captions(run_config, tmp_path, synth_dir, capsys, edit)
    assert code == 2
    assert records[2]["id"] in err and "2 <image> placeholder(s)" in err


@pytest.mark.slow  # torch.compile takes ~80 s on 2 CPU cores
def test_compiled_layers_give_the_same_losses(run_config, tmp_path):
    curves = []
    for compiled in (False, True):
        name = f"compile-{compiled}"
        cfg = run_config(name, stage="sft", train={"max_steps": 3, "compile": compiled}, data={"eval": None})
        assert main(["train", str(cfg)]) == 0
        curves.append([r["loss"] for r in train_lines(tmp_path / name)])
    assert len(curves[0]) == 3 and curves[1] == pytest.approx(curves[0], abs=1e-5)
