"""The grpo stage on tiny models: it runs with every loss aggregation, with and without the KL reference,
with LoRA and full fine-tuning, learns a rewarded behaviour, resumes exactly, and refuses bad reward
configurations before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import mmpost
import mmpost.training.loop
from mmpost.cli import main
from mmpost.training.metrics import read_metrics

LORA = {"lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}


def train_lines(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if "loss" in r]


DEFAULTS = {
    "data": {"train": {"path": "count.json"}, "eval": {"path": "count_heldout.jsonl"}},
    "train": {"lr": 1e-3, "max_steps": 3, "batch_size": 2},
}


@pytest.fixture
def grpo_config(after_sft):
    """A grpo run on the counting prompts, starting from a short sft run."""

    def write(name: str = "grpo", stage: dict | None = None, **sections):
        options = {"name": "grpo", "group_size": 4, "max_completion_length": 4, **(stage or {})}
        return after_sft(name, options, DEFAULTS, **sections)

    return write


@pytest.mark.parametrize(
    "stage, model",
    [
        ({}, {}),
        ({"aggregation": "dapo", "beta": 0.04, "iterations": 2, "epsilon_high": 0.28}, {}),
        ({"aggregation": "dr_grpo", "scale_rewards": False, "filter_zero_variance": True}, LORA),
        ({"beta": 0.1, "rewards": [{"name": "accuracy"}, {"name": "format", "weight": 0.5}]}, LORA),
    ],
)
def test_grpo_runs_and_logs_its_metrics(grpo_config, tmp_path, stage, model):
    assert main(["train", str(grpo_config(stage=stage, model=model))]) == 0
    lines = train_lines(tmp_path / "grpo")
    assert [r["step"] for r in lines] == [1, 2, 3]
    for key in (
        "reward/mean",
        "reward/std",
        "accuracy",
        "completion_length",
        "kl",
        "clip_fraction",
        "zero_variance_groups",
        "time/sampling_share",
    ):
        assert key in lines[0], key
    assert 0 < lines[0]["completion_length"] <= 4
    if stage.get("beta"):
        assert all(r["kl"] >= 0 for r in lines)
    else:
        assert all(r["kl"] == 0 for r in lines)
    final = mmpost.load(tmp_path / "grpo" / "final")
    assert final.has_lora == bool(model)


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "toy_rewards.py").write_text(
        "def brevity(completion, **fields):\n"
        "    return -float(len(completion.split()))\n"
        "def broken(completion, **fields):\n"
        "    raise RuntimeError('no score')\n"
        "def wordy(completion, **fields):\n"
        "    return 'good'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "toy_rewards"


def test_grpo_learns_what_the_reward_asks_for(grpo_config, tmp_path, reward_module):
    # a reward for short answers: the policy learns to end its completions sooner
    stage = {"rewards": [{"name": f"{reward_module}.brevity"}], "max_completion_length": 8, "group_size": 6}
    cfg = grpo_config(stage=stage, train={"max_steps": 30, "batch_size": 4, "lr": 2e-3}, data={"eval": None})
    assert main(["train", str(cfg)]) == 0
    lines = train_lines(tmp_path / "grpo")
    first, last = lines[:3], lines[-3:]
    assert sum(r["completion_length"] for r in last) < 0.7 * sum(r["completion_length"] for r in first)
    assert sum(r["reward/mean"] for r in last) > sum(r["reward/mean"] for r in first)


@pytest.mark.parametrize("lora", [False, True])
def test_grpo_resume_continues_the_same_run(grpo_config, tmp_path, monkeypatch, lora):
    train = {"max_steps": 6, "save_every": 3}
    stage = {"beta": 0.05}
    model = LORA if lora else {}
    assert main(["train", str(grpo_config("straight", stage=stage, train=train, model=model))]) == 0
    original = mmpost.training.loop.save_checkpoint

    def crash_after_step_3(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt("simulated crash")

    cfg = grpo_config("interrupted", stage=stage, train=train, model=model)
    monkeypatch.setattr(mmpost.training.loop, "save_checkpoint", crash_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        main(["train", str(cfg)])
    monkeypatch.setattr(mmpost.training.loop, "save_checkpoint", original)
    assert main(["train", str(cfg), "--resume"]) == 0
    keys = ("step", "loss", "reward/mean", "completion_length", "kl")
    straight = [tuple(round(r[k], 6) for k in keys) for r in train_lines(tmp_path / "straight")]
    resumed = [tuple(round(r[k], 6) for k in keys) for r in train_lines(tmp_path / "interrupted")]
    assert resumed == straight


@pytest.mark.parametrize(
    "reward, message",
    [
        ("no_such_package.rewards.score", "no_such_package.rewards.score"),
        ("acuracy", "did you mean 'accuracy'"),
    ],
)
def test_a_reward_that_cannot_be_found_fails_before_any_model_loads(grpo_config, monkeypatch, capsys, reward, message):
    cfg = grpo_config(stage={"rewards": [{"name": reward}]})
    monkeypatch.setattr("mmpost.stages.grpo.stage.build_model", lambda ctx: pytest.fail("a model was loaded"))
    assert main(["train", str(cfg)]) == 2
    assert message.lower() in capsys.readouterr().err.lower()


@pytest.mark.parametrize("function, message", [("broken", "no score"), ("wordy", "'good'")])
def test_a_reward_that_fails_names_the_function_and_the_sample(grpo_config, capsys, reward_module, function, message):
    cfg = grpo_config(stage={"rewards": [{"name": f"{reward_module}.{function}"}]})
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{reward_module}.{function}" in err and "count-0" in err and message in err


def test_prompts_without_answers_fail_before_any_model_loads(grpo_config, tmp_path, synth_dir, monkeypatch, capsys):
    records = json.loads((synth_dir / "count.json").read_text())
    del records[2]["answer"]
    (tmp_path / "count.json").write_text(json.dumps(records))
    data = {"train": {"path": str(tmp_path / "count.json"), "image_root": str(synth_dir / "images")}}
    monkeypatch.setattr("mmpost.stages.grpo.stage.build_model", lambda ctx: pytest.fail("a model was loaded"))
    assert main(["train", str(grpo_config(data=data))]) == 2
    assert "count-000002" in capsys.readouterr().err
