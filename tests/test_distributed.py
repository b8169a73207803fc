"""Two CPU processes (torchrun, gloo) train like one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType
from helpers import torchrun

import mmpost
import mmpost.training.accel as accel
from mmpost.config.schema import TrainConfig
from mmpost.training.metrics import read_metrics


def test_two_processes_match_one_with_the_same_global_batch(run_config, tmp_path, synth_dir):
    sft = {"path": str(synth_dir / "sft.json"), "image_root": str(synth_dir / "images")}
    # encoders train too: DDP must then allow their unused layers (past the feature layer)
    common = {
        "max_steps": 5,
        "lr": 1e-3,
        "log_every": 1,
        "grad_accum": 2,
        "trainable": ["connectors", "llm", "encoders"],
    }
    one = run_config("one", stage="sft", data={"train": sft, "eval": None}, train={**common, "batch_size": 4})
    two = run_config("two", stage="sft", data={"train": sft, "eval": None}, train={**common, "batch_size": 2})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "mmpost", "train", str(one)], check=True, env=env, capture_output=True)
    result = subprocess.run(
        torchrun("train", str(two), port=29533),
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    single = [r["loss"] for r in read_metrics(tmp_path / "one") if "loss" in r]
    double = [r["loss"] for r in read_metrics(tmp_path / "two") if "loss" in r]
    assert len(single) == len(double) == 5
    for a, b in zip(single, double, strict=True):
        assert abs(a - b) <= 1e-4 * abs(a), (single, double)
    assert single[-1] < single[0]


def test_refuses_processes_that_would_train_alone(monkeypatch):
    fake = SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO)
    monkeypatch.setattr(accel, "Accelerator", lambda **_: fake)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(accel.LaunchError, match="WORLD_SIZE=2 but accelerate runs 1 process"):
        accel.make_accelerator(TrainConfig())


def test_two_processes_train_two_modalities_when_a_batch_lacks_one(make_model, run_config, tmp_path):
    import json

    import yaml

    from mmpost.synthetic.tiny_audio import make_tiny_whisper
    from mmpost.synthetic.write import synthesize

    media = tmp_path / "media"
    synthesize(media, num_train=8, num_heldout=0, shard_size=8, modalities=("image", "audio"), progress=False)
    images = [
        {
            "messages": [
                {"role": "user", "content": r["conversations"][0]["value"]},
                {"role": "assistant", "content": r["conversations"][1]["value"]},
            ],
            "images": [f"images/{r['image']}"],
        }
        for r in json.loads((media / "align.json").read_text())
    ]
    audios = json.loads((media / "audio_align.json").read_text())
    (media / "both.json").write_text(json.dumps([x for pair in zip(images, audios, strict=True) for x in pair]))
    model = make_model("mlp")
    whisper = make_tiny_whisper(tmp_path / "whisper", d_model=32, layers=1, heads=4, max_source_positions=50)
    model.add_modality("audio", mmpost.encoder("whisper", path=str(whisper)), mmpost.connector("mlp"))
    model.save(tmp_path / "base")
    cfg = run_config(
        "two-media",
        data={"train": {"path": str(media / "both.json")}, "eval": None, "max_length": 384},
        train={"max_steps": 4, "batch_size": 1, "log_every": 1},
    )
    data = yaml.safe_load(cfg.read_text())
    data["from"], data["model"] = str(tmp_path / "base"), {}
    cfg.write_text(yaml.safe_dump(data))
    result = subprocess.run(
        torchrun("train", str(cfg), port=29534),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [r for r in read_metrics(tmp_path / "two-media") if "loss" in r]
    assert len(records) == 4 and records[-1]["data/skipped"] == 0
