"""What protects a run's work: checked checkpoints, safe deletion, a full disk, exports that cannot delete their
source, resumes that refuse changed settings, and reruns after a failed start."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

import mmpost
import mmpost.training.checkpoint as checkpoint_module
import mmpost.training.loop
from mmpost.cli import main
from mmpost.training.checkpoint import step_checkpoints
from mmpost.training.metrics import read_metrics


def error_line(capsys) -> str:
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("mmpost: error:")]
    return line


def curve(run: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["lr"]) for r in read_metrics(run) if "loss" in r]


@pytest.fixture
def stopped_run(run_config, monkeypatch):
    """``stop(name, **train)``: a run that crashes right after its checkpoint at ``stop_at`` (default 6)."""

    def stop(name: str, stop_at: int = 6, **train):
        cfg = run_config(name, train={"max_steps": 12, "save_every": 3, **train})
        original = mmpost.training.loop.save_checkpoint

        def crash(*args, **kwargs):
            path = original(*args, **kwargs)
            if path.name == f"step-{stop_at}":
                raise KeyboardInterrupt("simulated crash")
            return path

        monkeypatch.setattr(mmpost.training.loop, "save_checkpoint", crash)
        with pytest.raises(KeyboardInterrupt):
            main(["train", str(cfg)])
        monkeypatch.setattr(mmpost.training.loop, "save_checkpoint", original)
        return cfg

    return stop


# ------------------------------------------------------------------ resume with changed settings


def test_resume_with_changed_training_settings_is_refused_listing_them(stopped_run, capsys):
    cfg = stopped_run("changed")
    assert main(["train", str(cfg), "--resume", "--set", "train.lr=5e-3", "train.batch_size=4"]) == 2
    err = capsys.readouterr().err
    assert "train.lr: 0.003 -> 0.005" in err and "train.batch_size: 8 -> 4" in err and "--allow-changes" in err


def test_resume_may_change_what_does_not_shape_training(stopped_run, run_config, tmp_path):
    cfg = stopped_run("cadence")
    assert main(["train", str(cfg), "--resume", "--set", "train.log_every=2", "eval.max_new_tokens=2"]) == 0


FIXED = [
    ("seed=3", "fixes the data order"),
    ("train.trainable=[connectors,llm]", "parameter groups"),
    ("model.connectors.image.depth=1", "comes from the checkpoint"),
]


@pytest.mark.parametrize("override, reason", FIXED)
def test_some_settings_cannot_change_under_a_checkpoint(stopped_run, capsys, override, reason):
    cfg = stopped_run("fixed")
    assert main(["train", str(cfg), "--resume", "--allow-changes", "--set", override]) == 2
    assert reason in capsys.readouterr().err


def test_allowed_changes_rebuild_the_schedule_and_keep_the_data_position(stopped_run, tmp_path):
    cfg = stopped_run("adjusted", schedule="constant", warmup_ratio=0.0)
    assert main(["train", str(cfg), "--resume", "--allow-changes", "--set", "train.lr=5e-3", "train.batch_size=4"]) == 0
    lines = [r for r in read_metrics(tmp_path / "adjusted") if "loss" in r]
    assert [r["lr"] for r in lines[:6]] == [3e-3] * 6 and [r["lr"] for r in lines[6:]] == [5e-3] * 6
    # 96 samples: 6 steps of 8 drew 48 of epoch 0; batches of 4 continue at batch 12 of 24, still in epoch 0
    assert [r["epoch"] for r in lines[6:]] == [0] * 6
    assert "train.lr 0.003 -> 0.005" in (tmp_path / "adjusted" / "train.log").read_text()


# ------------------------------------------------------------------ checkpoints


def test_a_damaged_trainer_state_is_named(stopped_run, tmp_path, capsys):
    cfg = stopped_run("trainer")
    state = tmp_path / "trainer" / "checkpoints" / "step-6" / "trainer.pt"
    state.write_bytes(state.read_bytes()[:100])
    assert main(["train", str(cfg), "--resume"]) == 2
    line = error_line(capsys)
    assert f"{state} is damaged" in line and "step-3" in line  # the earlier checkpoint to fall back on


@pytest.mark.parametrize(
    "name, damage",
    [("mmpost.json", b"{not json"), ("parts.safetensors", b"\x00" * 64), ("trainer.pt", b"PK\x03\x04 torn")],
)
def test_damaged_files_without_checksums_are_named(stopped_run, tmp_path, capsys, name, damage):
    cfg = stopped_run("unchecked")
    folder = tmp_path / "unchecked" / "checkpoints" / "step-6"
    for manifest in folder.rglob("checksums.json"):
        manifest.unlink()  # a checkpoint written before checksums existed
    target = folder / name if name == "trainer.pt" else folder / "model" / name
    target.write_bytes(damage)
    assert main(["train", str(cfg), "--resume"]) == 2
    assert str(target) in error_line(capsys)


def test_from_a_damaged_model_directory_is_refused(run_config, tmp_path, synth_dir, capsys):
    assert main(["train", str(run_config("base", train={"max_steps": 1}))]) == 0
    weights = tmp_path / "base" / "final" / "parts.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10:] = b"\x00" * 10
    weights.write_bytes(bytes(data))
    train = {"path": str(synth_dir / "sft.json"), "image_root": str(synth_dir / "images")}
    sft = run_config(
        "next",
        stage="sft",
        model={"llm": {}, "encoders": {}, "connectors": {}},
        **{"from": str(tmp_path / "base")},
        data={"train": train},
    )
    assert main(["train", str(sft)]) == 2
    assert f"{weights} is damaged" in error_line(capsys)


def test_old_checkpoints_are_renamed_before_they_are_deleted(run_config, tmp_path, monkeypatch):
    cfg = run_config("rotate", train={"max_steps": 9, "save_every": 2, "keep_checkpoints": 1})
    real_rmtree = shutil.rmtree

    def killed_while_deleting(path, *args, **kwargs):
        path = Path(path)
        if path.name.startswith("step-") and (path / "model").is_dir():
            (path / "model" / "parts.safetensors").unlink()  # part of it is gone when the process dies
            raise KeyboardInterrupt("killed while deleting")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", killed_while_deleting)
    with pytest.raises(KeyboardInterrupt):
        main(["train", str(cfg)])
    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", real_rmtree)
    from mmpost.training.checkpoint import verify_checkpoint

    for _, path in step_checkpoints(tmp_path / "rotate"):
        verify_checkpoint(path)  # every checkpoint under a valid name is whole
    assert main(["train", str(cfg), "--resume"]) == 0
    assert [p.name for p in (tmp_path / "rotate" / "checkpoints").iterdir()] == ["step-8"]


Usage = namedtuple("Usage", "total used free")


def test_a_checkpoint_that_does_not_fit_is_refused_before_writing(run_config, tmp_path, monkeypatch, capsys):
    cfg = run_config("nospace", train={"max_steps": 6, "save_every": 2})
    calls = {"n": 0}
    real = shutil.disk_usage

    def shrinking(path):
        calls["n"] += 1
        return Usage(1, 1, 10_000) if calls["n"] > 1 else real(path)  # room for the first checkpoint only

    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", shrinking)
    assert main(["train", str(cfg)]) == 2
    line = error_line(capsys)
    assert "no space left on device for checkpoint step-4" in line and "MB are free" in line and "step-2" in line
    assert [p.name for p in (tmp_path / "nospace" / "checkpoints").iterdir()] == ["step-2"]


def test_a_write_that_fails_for_lack_of_space_is_removed_and_explained(run_config, tmp_path, monkeypatch, capsys):
    cfg = run_config("torn-write", train={"max_steps": 6, "save_every": 2})
    real_save, real_usage = checkpoint_module.torch.save, shutil.disk_usage
    state = {"full": False}

    def save(obj, path, *args, **kwargs):
        if Path(path).name == "trainer.pt" and "step-4" in str(path):
            state["full"] = True  # what torch's zip writer says when the device fills up
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 6047872 vs 6047764")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", save)
    monkeypatch.setattr(
        checkpoint_module.shutil, "disk_usage", lambda p: Usage(1, 1, 0) if state["full"] else real_usage(p)
    )
    assert main(["train", str(cfg)]) == 2
    assert "no space left on device for checkpoint step-4" in error_line(capsys)
    assert [p.name for p in (tmp_path / "torn-write" / "checkpoints").iterdir()] == ["step-2"]


def test_a_torn_metrics_line_other_than_the_last_is_named(run_config, tmp_path, capsys):
    cfg = run_config("torn-middle", train={"max_steps": 4, "save_every": 2})
    assert main(["train", str(cfg)]) == 0
    path = tmp_path / "torn-middle" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:10]
    path.write_text("\n".join(lines) + "\n")
    assert main(["train", str(cfg), "--resume"]) == 2
    assert f"{path}: line 2 is not a metrics record" in error_line(capsys)


# ------------------------------------------------------------------ run directories and exports


def test_a_rerun_after_a_failed_start_replaces_its_directory(run_config, tmp_path, capsys):
    cfg = run_config("retry", train={"max_steps": 1})
    assert main(["train", str(cfg), "--set", "model.encoders.image.feature_layer=99"]) == 2
    capsys.readouterr()
    assert main(["train", str(cfg)]) == 0
    assert (tmp_path / "retry" / "final").is_dir()


def test_a_directory_with_other_files_is_never_replaced(run_config, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["train", str(run_config("mine", train={"max_steps": 1}))]) == 2
    assert "is not empty" in error_line(capsys) and (tmp_path / "mine" / "notes.txt").is_file()


def test_an_out_that_is_a_file_is_an_error(run_config, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    assert main(["train", str(run_config("afile"))]) == 2
    assert "is a file" in error_line(capsys)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, synth_dir, llm_dir, clip_dir):
    from helpers import write_run_config

    folder = tmp_path_factory.mktemp("finished")
    cfg = write_run_config(folder, synth_dir, llm_dir, clip_dir, "run", train={"max_steps": 1})
    assert main(["train", str(cfg)]) == 0
    return folder / "run"


@pytest.mark.parametrize(
    "model, out", [("run", "run"), ("run", "run/exported"), ("run/final", "run"), ("run/final", "run/final")]
)
def test_an_export_never_overwrites_its_source(finished, capsys, model, out):
    before = sorted(p.relative_to(finished) for p in finished.rglob("*"))
    root = finished.parent
    assert main(["export", str(root / model), "--out", str(root / out), "--force"]) == 2
    assert "the model being exported" in error_line(capsys)
    assert sorted(p.relative_to(finished) for p in finished.rglob("*")) == before


def test_an_export_out_that_is_a_file_is_an_error(finished, tmp_path, capsys):
    (tmp_path / "out.bin").write_bytes(b"")
    assert main(["export", str(finished), "--out", str(tmp_path / "out.bin")]) == 2
    assert "is a file" in error_line(capsys)


def test_saved_models_carry_checksums_that_loading_checks(finished, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(finished / "final", copy)
    assert json.loads((copy / "checksums.json").read_text())["files"]["parts.safetensors"]["size"] > 0
    mmpost.load(copy)
    with (copy / "llm" / "config.json").open("a") as f:
        f.write(" ")
    with pytest.raises(ValueError, match=r"llm/config.json is damaged"):
        mmpost.load(copy)


def test_a_run_launched_with_relative_paths_works_from_any_folder(tmp_path, synth_dir, llm_dir, clip_dir, monkeypatch):
    import yaml
    from helpers import write_run_config

    project = tmp_path / "project"
    shutil.copytree(synth_dir, project / "data")
    cfg = write_run_config(
        project,
        synth_dir,
        llm_dir,
        clip_dir,
        "sft",
        stage="sft",
        data={
            "train": {"path": "data/sft.json", "image_root": "data/images"},
            "eval": {"path": "data/heldout.jsonl", "image_root": "data/images"},
        },
        train={"max_steps": 4, "save_every": 2},
    )
    raw = yaml.safe_load(cfg.read_text())
    raw["out"] = "runs/sft"
    cfg.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(project)
    assert main(["train", "sft.yaml"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = project / "runs" / "sft"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert Path(saved["data"]["train"]["path"]).is_absolute() and Path(saved["out"]).is_absolute()
    # calibration reads the run's own training data
    assert main(["export", str(run), "--format", "mmpost", "--quantize", "w4a16-gptq", "--out", "quantized"]) == 0
    assert main(["train", str(run / "config.yaml"), "--resume"]) == 0  # --resume through the run's config
    teacher = write_run_config(
        elsewhere,
        synth_dir,
        llm_dir,
        clip_dir,
        "distill",
        stage={"name": "distill", "teacher": str(run)},
        data={
            "train": {"path": str(project / "data" / "sft.json"), "image_root": str(project / "data" / "images")},
            "eval": None,
        },
        train={"max_steps": 1},
        model={"llm": {}, "encoders": {}, "connectors": {}},
        **{"from": str(run)},
    )
    assert main(["train", str(teacher)]) == 0
