"""The ppo stage on tiny models: a step's loss is ``mmpost.losses.ppo`` on the step's own samples, values and
scores, it learns what the reward asks for, runs with LoRA and full fine-tuning, resumes exactly, two processes
train as one with the same global batch, and bad settings are refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import torchrun, write_run_config

import mmpost
import mmpost.stages.ppo.stage as ppo_stage
import mmpost.training.loop
from mmpost.cli import main
from mmpost.interfaces import IGNORE
from mmpost.losses.ppo import ppo_loss, ppo_rollout
from mmpost.model.positions import positions_of
from mmpost.training.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

LORA = {"lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}
DEFAULTS = {
    "data": {"train": {"path": "count.json"}, "eval": {"path": "count_heldout.jsonl"}},
    "train": {"lr": 1e-3, "max_steps": 3, "batch_size": 2},
}


def train_lines(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if "loss" in r]


@pytest.fixture
def ppo_config(after_sft):
    """A ppo run on the counting prompts, starting from a short sft run."""

    def write(name: str = "ppo", stage: dict | None = None, **sections):
        options = {"name": "ppo", "max_completion_length": 4, "iterations": 2, **(stage or {})}
        return after_sft(name, options, DEFAULTS, **sections)

    return write


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "ppo_toy_rewards.py").write_text(
        "def brevity(completion, **fields):\n"
        "    return -float(len(completion.split()))\n"
        "def varied(completion, **fields):\n"
        "    return float(len(completion) % 3)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "ppo_toy_rewards"


def columns(model: mmpost.LMM, r, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``([B, L] completion log-probs, [B, L] values, [B, L] mask)`` of a rollout from a plain forward of every
    position (no labels) and the value head applied to the decoder's hidden states."""
    head = model.heads["value"]
    with torch.no_grad():
        logits = model(r.input_ids, r.attention_mask, r.media, media_repeat=1).dense()[:, :-1].float()
        if hasattr(head, "decoder"):  # a separate critic: its own decoder on the LMM's input embeddings
            embeds, _ = model.embed(r.input_ids, r.media, positions_of(r.attention_mask))
            positions = positions_of(r.attention_mask)
            hidden = head.decoder(inputs_embeds=embeds, attention_mask=r.attention_mask, position_ids=positions)
            values = (hidden.last_hidden_state @ head.head.score.weight[0]).float()
        else:
            hidden = model.hidden_states(r.input_ids, r.attention_mask, r.media)
            values = (hidden @ head.score.weight[0]).float()
    logps = (logits / temperature).log_softmax(-1).gather(-1, r.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    start, end = r.prompt_width - 1, r.input_ids.shape[1] - 1
    mask = r.labels[:, r.prompt_width :] != IGNORE
    return logps[:, start:end], values[:, start:end], mask.long()


@pytest.mark.parametrize("value_model", ["shared", "separate"])
def test_the_step_loss_is_ppo_loss_on_the_step_samples(ppo_config, tmp_path, monkeypatch, reward_module, value_model):
    """Two steps of μ = 2 with the KL penalty on two micro-batches: the second update of the second step (policy
    moved from the sampling policy, which moved from the reference) is recomputed from the sampled rows, the scores
    and plain forwards of the three models, through ``ppo_rollout`` (GAE, whitening over the step) and
    ``ppo_loss``."""
    beta, temperature = 0.1, 0.9
    stage = {"beta": beta, "temperature": temperature, "rewards": [{"name": f"{reward_module}.varied"}]}
    stage["value_model"] = value_model
    cfg = ppo_config(stage=stage, train={"max_steps": 2, "grad_accum": 2, "lr": 5e-3}, data={"eval": None})
    calls = []
    original = ppo_stage.optimizer_step

    def recording(training, items, loss_fn, scale, counted=None, update=True):
        weights = {name: w.detach().clone() for name, w in training.model.state_dict().items()}
        sums = original(training, items, loss_fn, scale, counted, update)
        calls.append((weights, [item[0] for item in items], float(sums.loss_sum)))
        return sums

    monkeypatch.setattr(ppo_stage, "optimizer_step", recording)
    assert main(["train", str(cfg)]) == 0
    assert len(calls) == 4  # 2 steps x μ = 2

    def model_with(weights):
        model = mmpost.load(tmp_path / "ppo" / "final")  # the final model has the value head
        model.load_state_dict(weights)
        return model.eval()

    reference = mmpost.load(tmp_path / "sft" / "final").eval()
    (sampling_weights, rollouts, _), (current_weights, _, stage_loss) = calls[2], calls[3]
    sampler, policy = model_with(sampling_weights), model_with(current_weights)
    old = [columns(sampler, r, temperature) for r in rollouts]
    new = [columns(policy, r, temperature) for r in rollouts]
    ref = []
    for r in rollouts:
        with torch.no_grad():
            logits = reference(r.input_ids, r.attention_mask, r.media).dense()[:, :-1].float() / temperature
        logps = logits.log_softmax(-1).gather(-1, r.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        ref.append(logps[:, r.prompt_width - 1 :])
    width = max(m.shape[1] for _, _, m in old)

    def padded(tensors):
        return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tensors])

    scores = torch.cat([r.rewards for r in rollouts])
    mask = padded([m for _, _, m in old])
    rollout = ppo_rollout(
        padded([x for x, _, _ in old]), padded(ref), padded([v for _, v, _ in old]), scores, mask, kl_coef=beta
    )
    rows = [len(r.rewards) for r in rollouts]

    def loss_of(advantages, returns) -> float:
        total = 0.0
        for (x, v, _), (xo, vo, m), a, ret in zip(new, old, advantages.split(rows), returns.split(rows), strict=True):
            length = m.shape[1]
            total += float(ppo_loss(x, xo, v, vo, a[:, :length], ret[:, :length], m).loss) / len(rollouts)
        return total

    expected = loss_of(rollout.advantages, rollout.returns)
    print(f"stage loss {stage_loss:.9f}, recomputed {expected:.9f}, difference {abs(stage_loss - expected):.2e}")
    assert abs(stage_loss - expected) <= 1e-5
    # the test can tell: without the KL penalty the advantages and returns are others
    plain = ppo_rollout(
        padded([x for x, _, _ in old]), padded(ref), padded([v for _, v, _ in old]), scores, mask, kl_coef=0.0
    )
    assert abs(loss_of(plain.advantages, plain.returns) - expected) > 1e-4
    logged = train_lines(tmp_path / "ppo")[1]
    kl = float(rollout.kl.sum(1).mean())
    assert kl > 0 and logged["kl"] == pytest.approx(kl, rel=1e-4)


@pytest.mark.parametrize(
    "stage, model",
    [
        ({"beta": 0.0}, {}),
        ({"kl_estimator": "k3", "whiten_rewards": True}, LORA),
        ({"value_model": "separate"}, LORA),
    ],
)
def test_ppo_runs_and_logs_its_metrics(ppo_config, tmp_path, monkeypatch, reward_module, stage, model):
    if stage.get("beta") == 0.0:
        monkeypatch.setattr(
            "mmpost.stages.grpo.stage.make_reference", lambda *a: pytest.fail("beta = 0 loaded a reference")
        )
    rewards = [{"name": "accuracy"}, {"name": f"{reward_module}.varied", "weight": 0.5}]
    stage = {"rewards": rewards, "missing_eos_penalty": 1.0, **stage}
    assert main(["train", str(ppo_config(stage=stage, model=model))]) == 0
    lines = train_lines(tmp_path / "ppo")
    assert [r["step"] for r in lines] == [1, 2, 3]
    for key in (*ppo_stage.EXTRA, "score", "reward/mean", "accuracy", "kl", "clip_fraction", "completion_length"):
        assert key in lines[0], key
    assert all(r["value_loss"] > 0 for r in lines)
    if stage.get("beta", 0.05) > 0:
        assert lines[0]["kl"] == 0 and any(r["kl"] != 0 for r in lines[1:])  # the policy starts as the reference
    final = mmpost.load(tmp_path / "ppo" / "final")
    assert final.has_lora == bool(model) and list(final.heads) == ["value"]
    if stage.get("value_model") == "separate":  # the critic's own decoder trained (all of it), the policy's base not
        start = mmpost.load(tmp_path / "sft" / "final").base_llm.get_decoder().state_dict()
        critic = final.heads["value"].decoder.state_dict()
        policy = final.base_llm.get_decoder().state_dict()
        key = "layers.0.mlp.up_proj.weight"  # not a LoRA target: frozen in the policy
        assert not torch.equal(critic[key], start[key]) and torch.equal(policy[key], start[key])


@pytest.mark.parametrize("lora, value_model", [(False, "shared"), (True, "shared"), (False, "separate")])
def test_ppo_resume_continues_the_same_run(ppo_config, tmp_path, monkeypatch, reward_module, lora, value_model):
    train = {"max_steps": 6, "save_every": 3}
    stage = {"beta": 0.1, "rewards": [{"name": f"{reward_module}.varied"}], "value_model": value_model}
    model = LORA if lora else {}
    assert main(["train", str(ppo_config("straight", stage=stage, train=train, model=model))]) == 0
    original = mmpost.training.loop.save_checkpoint

    def crash_after_step_3(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt("simulated crash")

    cfg = ppo_config("interrupted", stage=stage, train=train, model=model)
    monkeypatch.setattr(mmpost.training.loop, "save_checkpoint", crash_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        main(["train", str(cfg)])
    monkeypatch.setattr(mmpost.training.loop, "save_checkpoint", original)
    assert main(["train", str(cfg), "--resume"]) == 0
    keys = ("step", "loss", "value_loss", "reward/mean", "kl", "value/mean")
    straight = [tuple(round(r[k], 7) for k in keys) for r in train_lines(tmp_path / "straight")]
    resumed = [tuple(round(r[k], 7) for k in keys) for r in train_lines(tmp_path / "interrupted")]
    assert resumed == straight
    assert len({r[5] for r in straight}) > 1  # the value head moves, so the curves say something
    a = mmpost.load(tmp_path / "straight" / "final").state_dict()
    b = mmpost.load(tmp_path / "interrupted" / "final").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("heads.value") for k in a)


@pytest.mark.slow  # ~30 s, three launches
def test_two_processes_train_as_one_with_the_same_global_batch(tmp_path, synth_dir, llm_dir, clip_dir, reward_module):
    """One process with two micro-batches of one prompt against two processes with one each: nucleus sampling
    with a tiny ``top_p`` draws the same completions in both, and with the advantages whitened over both processes
    the curves are the same."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(tmp_path)}
    stage = {"name": "ppo", "max_completion_length": 4, "top_p": 1e-6, "iterations": 2, "beta": 0.1}
    stage["rewards"] = [{"name": f"{reward_module}.varied"}]
    data = {"train": {"path": str(synth_dir / "count.json"), "image_root": str(synth_dir / "images")}, "eval": None}
    common = {"max_steps": 4, "batch_size": 1, "lr": 1e-3, "log_every": 1, "warmup_ratio": 0.0}
    one = write_run_config(
        tmp_path, synth_dir, llm_dir, clip_dir, "one", stage=stage, data=data, train={**common, "grad_accum": 2}
    )
    two = write_run_config(tmp_path, synth_dir, llm_dir, clip_dir, "two", stage=stage, data=data, train=common)
    done = subprocess.run(
        [sys.executable, "-m", "mmpost", "train", str(one)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    done = subprocess.run(torchrun("train", str(two), port=29871), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    keys = ("loss", "value_loss", "kl", "reward/mean", "value/mean")
    curves = {run: [[r[k] for k in keys] for r in train_lines(tmp_path / run)] for run in ("one", "two")}
    assert len(curves["one"]) == len(curves["two"]) == 4
    assert any(c[2] != 0 for c in curves["one"])  # the policy moves from the reference
    for a, b in zip(curves["one"], curves["two"], strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), curves


def test_prompts_without_answers_fail_before_any_model_loads(ppo_config, tmp_path, synth_dir, monkeypatch, capsys):
    import json

    records = json.loads((synth_dir / "count.json").read_text())
    del records[1]["answer"]
    (tmp_path / "count.json").write_text(json.dumps(records))
    data = {"train": {"path": str(tmp_path / "count.json"), "image_root": str(synth_dir / "images")}}
    monkeypatch.setattr("mmpost.stages.grpo.stage.build_model", lambda ctx: pytest.fail("a model was loaded"))
    assert main(["train", str(ppo_config(data=data))]) == 2
    assert "count-000001" in capsys.readouterr().err


def test_a_value_model_that_is_not_built_is_refused(ppo_config, capsys):
    assert main(["train", str(ppo_config(stage={"value_model": "critic"}))]) == 2
    assert "value_model" in capsys.readouterr().err


def test_trainable_parts_without_the_value_head_are_refused(ppo_config, capsys):
    assert main(["train", str(ppo_config(train={"trainable": ["llm"]}))]) == 2
    assert "ppo trains a value head: add 'heads' to train.trainable" in capsys.readouterr().err
