"""The rm stage on tiny models: its loss is TRL's Bradley–Terry loss (worked numbers, TRL's own ``compute_loss``, and
a plain forward of the trained weights), the held-out pair accuracy rises, LoRA and full fine-tuning save a reward
model that reloads with its head, a resumed run continues the same curve, two processes train as one, and data the
stage cannot use is refused before any model loads."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import make_batch, torchrun

import mmpost
import mmpost.training.loop
import mmpost.training.step
from mmpost.cli import main
from mmpost.data.sources import read_records
from mmpost.interfaces import IGNORE
from mmpost.losses.rm import bradley_terry_loss
from mmpost.model.completions import eos_token_ids
from mmpost.model.heads import add_head
from mmpost.stages.rm.stage import RewardLoss, pair_rewards
from mmpost.training.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]

LORA = {"lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}
DEFAULTS = {
    "data": {"train": {"path": "pairs.json", "max_samples": 16}, "eval": {"path": "pairs_heldout.jsonl"}},
    "train": {"lr": 1e-3, "max_steps": 6, "batch_size": 8},
}


def train_lines(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if "loss" in r]


def eval_lines(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if "eval/loss" in r]


@pytest.fixture
def rm_config(after_sft):
    """An rm run on the synthetic pairs, starting from a short sft run."""

    def write(name: str = "rm", stage: dict | None = None, **sections):
        return after_sft(name, {"name": "rm", **(stage or {})}, DEFAULTS, **sections)

    return write


def rewritten_pairs(synth_dir: Path, folder: Path, change: Callable[[int, dict, list[dict]], dict]) -> dict:
    """``data`` of the synthetic training and held-out pairs with ``change(i, record, records)`` applied to each record,
    written to ``folder``."""
    data = {}
    for split, name in (("train", "pairs.json"), ("eval", "pairs_heldout.jsonl")):
        text = (synth_dir / name).read_text()
        records = json.loads(text) if name.endswith(".json") else [json.loads(x) for x in text.splitlines() if x]
        path = folder / f"{split}_pairs.json"
        path.write_text(json.dumps([change(i, r, records) for i, r in enumerate(records)]))
        data[split] = {"path": str(path), "image_root": str(synth_dir / "images")}
    return data


def with_margins(synth_dir: Path, folder: Path) -> dict:
    """``data`` of the synthetic pairs with a margin each (0, 0.5 or 1)."""
    return rewritten_pairs(synth_dir, folder, lambda i, record, _: record | {"margin": i % 3 / 2})


def off_task_pairs(synth_dir: Path, folder: Path) -> dict:
    """``data`` of the synthetic pairs with each rejected answer replaced by the reply to another task's question
    ("3" to "What colour are the shapes?"): a preference a tiny model can learn from the text within seconds, where
    the synthetic pairs' own (the right colour, shape or count) needs a model that already sees them."""

    def off_task(i: int, record: dict, records: list[dict]) -> dict:
        other = next(r for r in records[i + 1 :] + records[:i] if r["task"] != record["task"])
        return record | {"rejected": other["chosen"]}

    return rewritten_pairs(synth_dir, folder, off_task)


def test_bradley_terry_loss_hand_worked():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.5])
    # -log σ(x) = log(1 + e^-x): log(1 + e^-1) = 0.313261687518223, log(1 + e^0.5) = 0.974076984180107
    torch.testing.assert_close(
        bradley_terry_loss(chosen, rejected), torch.tensor([0.313261687518223, 0.974076984180107])
    )
    # margins 0.5 and 0: x = 0.5 and -0.5, log(1 + e^-0.5) = 0.474076984180107
    margin = torch.tensor([0.5, 0.0])
    torch.testing.assert_close(
        bradley_terry_loss(chosen, rejected, margin), torch.tensor([0.474076984180107, 0.974076984180107])
    )
    # centring η = 0.1 adds 0.1 (r_c + r_r)²: 0.1 * 9 = 0.9 and 0.1 * 0.25 = 0.025
    torch.testing.assert_close(
        bradley_terry_loss(chosen, rejected, margin, center_coefficient=0.1),
        torch.tensor([1.374076984180107, 0.999076984180107]),
    )


class _ScoresModel(torch.nn.Module):
    """An LMM reduced to its reward head's output: prescribed ``[2N, T]`` values."""

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.values = values

    def forward(self, input_ids, attention_mask, media, media_repeat=1, head=None):
        assert media_repeat == 2 and head == "reward"
        return SimpleNamespace(values=self.values)


@pytest.mark.parametrize("margin, center", [(False, None), (True, None), (False, 0.01), (True, 0.3)])
def test_the_stage_loss_equals_trl_reward_trainer_compute_loss(margin, center):
    """TRL 1.16's ``RewardTrainer.compute_loss`` itself, on a trainer given only the attributes it reads, against
    the stage's loss on the same rewards: loss, accuracy and margin within 1e-6."""
    pytest.importorskip("trl")
    from trl.trainer.reward_trainer import RewardTrainer

    n, width = 6, 5
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(2 * n, width, generator=generator, dtype=torch.float64) * 2  # [2N, T]
    mask = torch.ones(2 * n, width, dtype=torch.long)
    mask[::3, :2] = 0  # left padding
    # every row: ..., answer, end-of-turn token (id 2), newline (id 9); the answer is the last 3 tokens
    input_ids = torch.full((2 * n, width), 5).index_fill(1, torch.tensor([width - 2]), 2)
    input_ids[:, -1] = 9
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, -3:] = input_ids[:, -3:]
    margins = torch.rand(n, generator=generator, dtype=torch.float64)
    ids = [f"p{i}" for i in range(n)]
    batch = SimpleNamespace(input_ids=input_ids, attention_mask=mask, labels=labels, media={}, ids=ids, pairs=n)
    loss = RewardLoss({2}, dict(zip(ids, margins.tolist(), strict=True)) if margin else None, center)
    ours = loss(_ScoresModel(values), batch)

    accelerator = SimpleNamespace(gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer = object.__new__(RewardTrainer)
    trainer.__dict__.update(
        model=SimpleNamespace(training=True),
        args=SimpleNamespace(center_rewards_coefficient=center),
        accelerator=accelerator,
        _total_train_tokens=0,
        _tp_size=1,
        _metrics={"train": defaultdict(list)},
    )
    scores = values[:, -2]  # [2N] at the end-of-turn token; TRL's batches hold every chosen row, then every rejected
    logits = torch.cat([scores[0::2], scores[1::2]])[:, None]
    inputs = {"attention_mask": mask} | ({"margin": margins} if margin else {})
    expected = trainer.compute_loss(lambda **kw: SimpleNamespace(logits=logits), inputs)
    assert float(ours.loss_sum) / n == pytest.approx(float(expected), abs=1e-6)
    metrics = trainer._metrics["train"]
    assert float(ours.stats["rewards/accuracy"]) / n == pytest.approx(metrics["accuracy"][0], abs=1e-6)
    assert float(ours.stats["rewards/margin"]) / n == pytest.approx(metrics["margin"][0], abs=1e-6)
    assert 0 < metrics["accuracy"][0] < 1


def test_the_step_loss_is_bradley_terry_on_a_plain_forward(rm_config, tmp_path, synth_dir, monkeypatch):
    """The second step's logged loss (margins and centring on, two micro-batches) is the Bradley–Terry loss of the
    rewards that a plain forward of the step's weights gives the step's pairs: the head on the last hidden state at
    each answer's end-of-turn token."""
    stage = {"margin": True, "center_rewards_coefficient": 0.05}
    data = with_margins(synth_dir, tmp_path)
    cfg = rm_config(stage=stage, data=data, train={"max_steps": 2, "grad_accum": 2, "batch_size": 4, "lr": 5e-3})
    calls = []
    original = mmpost.training.step.optimizer_step

    def recording(training, items, loss_fn, *args, **kwargs):
        calls.append(({k: w.detach().clone() for k, w in training.model.state_dict().items()}, list(items)))
        return original(training, items, loss_fn, *args, **kwargs)

    monkeypatch.setattr(mmpost.training.step, "optimizer_step", recording)
    assert main(["train", str(cfg)]) == 0
    weights, batches = calls[1]
    model = mmpost.load(tmp_path / "sft" / "final")
    add_head(model, "reward")
    model.load_state_dict(weights)
    model.eval()
    margins = {r.id: r.meta["margin"] for r in read_records(**data["train"])}
    (eos,) = eos_token_ids(model)
    chosen, rejected, margin = [], [], []
    with torch.no_grad():
        for batch in batches:
            hidden = model.hidden_states(batch.input_ids, batch.attention_mask, batch.media, media_repeat=2)
            # each answer's end-of-turn token, before the newline the chat template writes after it
            end = ((batch.input_ids == eos) & (batch.labels != IGNORE)).int().argmax(-1)  # [2N]
            assert (end == batch.input_ids.shape[1] - 2).all()
            rewards = hidden[torch.arange(len(end)), end] @ model.heads["reward"].score.weight[0]  # [2N]
            chosen.append(rewards[0::2]), rejected.append(rewards[1::2])
            margin += [margins[i] for i in batch.ids]
    chosen, rejected, margin = torch.cat(chosen), torch.cat(rejected), torch.tensor(margin)
    expected = float((-F.logsigmoid(chosen - rejected - margin) + 0.05 * (chosen + rejected) ** 2).mean())
    logged = train_lines(tmp_path / "rm")[1]
    print(f"logged {logged['loss']:.8f}, recomputed {expected:.8f}")
    assert logged["loss"] == pytest.approx(expected, abs=1e-6)
    # the figure can tell: without the margins, or without the centring term, it is another
    assert abs(float(bradley_terry_loss(chosen, rejected, None, 0.05).mean()) - expected) > 1e-3
    assert abs(float(bradley_terry_loss(chosen, rejected, margin).mean()) - expected) > 1e-4
    assert logged["rewards/accuracy"] == pytest.approx(float((chosen > rejected).float().mean()), abs=1e-6)
    assert logged["rewards/margin"] == pytest.approx(float((chosen - rejected).mean()), abs=1e-5)


def test_rm_learns_the_preference(rm_config, tmp_path, synth_dir):
    """From the 4-step sft start, 96 steps on the 96 training pairs (an answer to the question asked over one to
    another question) lift the held-out pair accuracy on the 30 held-out pairs from chance to well above it (0.50 ->
    1.00 measured). The synthetic pairs' own preference is learnt from the demo's sft model in the opt-in
    ``test_the_demo_config_ranks_held_out_pairs``."""
    cfg = rm_config(
        data=off_task_pairs(synth_dir, tmp_path),
        train={"max_steps": 96, "lr": 1e-3, "eval_every": 0},
        eval={"max_samples": 30},
    )
    assert main(["train", str(cfg)]) == 0
    before, after = eval_lines(tmp_path / "rm")[0], eval_lines(tmp_path / "rm")[-1]
    print(f"held-out pair accuracy {before['eval/accuracy']:.3f} -> {after['eval/accuracy']:.3f}")
    assert before["eval/loss"] == pytest.approx(math.log(2), abs=0.01)  # a fresh head scores every answer alike
    assert after["eval/accuracy"] >= 0.85 and after["eval/accuracy"] >= before["eval/accuracy"] + 0.25
    assert after["eval/margin"] > 1.0 and after["eval/loss"] < 0.5 * before["eval/loss"]
    lines = train_lines(tmp_path / "rm")
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"):
        assert key in lines[0]


@pytest.mark.slow
def test_the_demo_config_ranks_held_out_pairs(demo_sft, tmp_path):
    """``configs/demo/rm.yaml`` from the demo's sft model: held-out pair accuracy at least 0.90 on the 300 held-out
    pairs (a right colour, shape or count over a wrong one; a few minutes on 2 CPU cores)."""
    data = demo_sft / "data"
    overrides = [
        f"out={tmp_path / 'rm'}",
        f"from={demo_sft / 'runs' / 'sft'}",
        f"data.train.path={data / 'pairs.json'}",
        f"data.train.image_root={data / 'images'}",
        f"data.eval.path={data / 'pairs_heldout.jsonl'}",
        f"data.eval.image_root={data / 'images'}",
    ]
    assert main(["train", str(ROOT / "configs" / "demo" / "rm.yaml"), "--set", *overrides]) == 0
    summary = json.loads((tmp_path / "rm" / "summary.json").read_text())
    before, after = summary["eval_before"]["eval/accuracy"], summary["eval_after"]["eval/accuracy"]
    print(f"held-out pair accuracy {before:.3f} -> {after:.3f} in {summary['seconds']} s")
    assert after >= 0.9


@pytest.mark.parametrize("model", [{}, LORA], ids=["full", "lora"])
def test_full_and_lora_training_save_a_reward_model_that_reloads(rm_config, tmp_path, synth_dir, model, caplog):
    caplog.set_level("INFO", logger="mmpost")
    assert main(["train", str(rm_config(model=model))]) == 0
    final = mmpost.load(tmp_path / "rm" / "final").eval()
    assert list(final.heads) == ["reward"] and final.has_lora == bool(model)
    # the reloaded model scores the held-out pairs as the run's last evaluation, on the model in memory, did
    samples = read_records(synth_dir / "pairs_heldout.jsonl", image_root=str(synth_dir / "images"))[:8]
    with torch.no_grad():
        chosen, rejected = pair_rewards(final, make_batch(final, samples, "pair"), eos_token_ids(final))
    last = eval_lines(tmp_path / "rm")[-1]
    assert float(chosen.mean()) == pytest.approx(last["eval/rewards/chosen"], abs=1e-5)
    assert float((chosen > rejected).float().mean()) == pytest.approx(last["eval/accuracy"])
    table = caplog.text.split("trainable parameters (")[1]
    assert table.startswith("llm.lora, heads)" if model else "llm, heads)")
    head_row = next(line.split() for line in table.splitlines() if line.startswith("heads.reward"))
    assert head_row[1:] == [str(final.hidden_size), "0"]  # the head trains, with LoRA too


@pytest.mark.parametrize("model", [{}, LORA], ids=["full", "lora"])
def test_rm_resume_continues_the_same_run(rm_config, tmp_path, monkeypatch, model):
    train = {"max_steps": 6, "save_every": 3}
    assert main(["train", str(rm_config("straight", train=train, model=model))]) == 0
    original = mmpost.training.loop.save_checkpoint

    def crash_after_step_3(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt("simulated crash")

    cfg = rm_config("interrupted", train=train, model=model)
    monkeypatch.setattr(mmpost.training.loop, "save_checkpoint", crash_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        main(["train", str(cfg)])
    monkeypatch.setattr(mmpost.training.loop, "save_checkpoint", original)
    assert main(["train", str(cfg), "--resume"]) == 0
    keys = ("step", "loss", "rewards/margin", "rewards/accuracy")
    straight = [tuple(round(r[k], 7) for k in keys) for r in train_lines(tmp_path / "straight")]
    resumed = [tuple(round(r[k], 7) for k in keys) for r in train_lines(tmp_path / "interrupted")]
    assert resumed == straight
    assert eval_lines(tmp_path / "straight")[-1] == eval_lines(tmp_path / "interrupted")[-1]
    a = mmpost.load(tmp_path / "straight" / "final").state_dict()
    b = mmpost.load(tmp_path / "interrupted" / "final").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("heads.reward.") for k in a)


def untied_llm(llm_dir: Path, folder: Path) -> Path:
    """The tiny LLM with an output embedding of its own (a copy of the input one), as most released LLMs have."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(llm_dir)
    config.tie_word_embeddings = False
    llm = AutoModelForCausalLM.from_pretrained(llm_dir, config=config)
    llm.lm_head.weight.data = llm.get_input_embeddings().weight.data.clone()
    llm.save_pretrained(folder / "untied")
    AutoTokenizer.from_pretrained(llm_dir).save_pretrained(folder / "untied")
    return folder / "untied"


def test_two_processes_train_as_one_with_the_same_global_batch(run_config, tmp_path, synth_dir, llm_dir):
    """Every pair of the step weighs the same over both processes, and the held-out figures are reduced across
    them (8 held-out pairs, 4 each). The LLM trains whole and its LM head is untied: a weight the reward's forward
    never reads, which DDP must be told of."""
    images = str(synth_dir / "images")
    data = {
        "train": {"path": str(synth_dir / "pairs.json"), "image_root": images},
        "eval": {"path": str(synth_dir / "pairs_heldout.jsonl"), "image_root": images},
    }
    model = {"llm": {"path": str(untied_llm(llm_dir, tmp_path))}}
    common = {"max_steps": 4, "lr": 2e-3, "log_every": 1}
    one, two = (
        run_config(name, stage={"name": "rm"}, model=model, data=data, train={**common, "batch_size": batch})
        for name, batch in (("one", 4), ("two", 2))
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "mmpost", "train", str(one)], check=True, env=env, capture_output=True)
    result = subprocess.run(torchrun("train", str(two), port=29583), env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    single, double = train_lines(tmp_path / "one"), train_lines(tmp_path / "two")
    assert len(single) == len(double) == 4
    for a, b in zip(single, double, strict=True):
        for key in ("loss", "rewards/margin", "rewards/accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    held_out = eval_lines(tmp_path / "one"), eval_lines(tmp_path / "two")
    assert len(held_out[0]) == len(held_out[1]) == 2
    for a, b in zip(*held_out, strict=True):
        for key in ("eval/loss", "eval/accuracy", "eval/margin"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("case", ["unpaired", "margin", "margin_shards"])
def test_data_the_stage_cannot_use_is_refused_before_a_model_loads(
    rm_config, tmp_path, synth_dir, monkeypatch, capsys, case
):
    monkeypatch.setattr("mmpost.stages.rm.stage.build_model", lambda ctx: pytest.fail("a model was loaded"))
    images = str(synth_dir / "images")
    stage, data = {}, {}
    if case == "unpaired":
        data = {"train": {"path": str(synth_dir / "unpaired.json"), "image_root": images}}
        expected = ["unpaired example", "'chosen' and a 'rejected'", "sample 'unpaired-000000'"]
    elif case == "margin":
        data = rewritten_pairs(synth_dir, tmp_path, lambda i, record, _: record | ({"margin": 1} if i != 4 else {}))
        stage, expected = {"margin": True}, ["pair-000004", "'margin'", "stage.margin"]
    else:
        data = {"train": {"path": str(synth_dir / "pair_shards"), "image_root": images}}
        stage, expected = {"margin": True}, ["stage.margin needs data.train as a .json / .jsonl file"]
    assert main(["train", str(rm_config(stage=stage, data=data))]) != 0
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, err
