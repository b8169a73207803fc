"""A trained reward model as a reward (``{name: model, path: ...}``): its scores are the head's value at each rollout
row's last token, batched by whole prompt groups; it stays frozen through a grpo run; and a reward model that would
misread the policy's rows, or a bad entry, is refused with a message that says why."""

from __future__ import annotations

import functools
import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_batch
from PIL import Image

import mmpost
from mmpost.data.sample import Sample
from mmpost.losses.grpo import group_advantages
from mmpost.model.completions import eos_token_ids
from mmpost.model.heads import add_head
from mmpost.reward_model import ModelReward, RewardRows
from mmpost.rewards import RewardError, RewardSet
from mmpost.stages.grpo.rollout import score

pytestmark = pytest.mark.usefixtures("one_thread")

GROUP = 3


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def save_reward_model(model: mmpost.LMM, path: Path) -> Path:
    """``model`` with a reward head of random weights (scores of order one), saved at ``path``."""
    head = add_head(model, "reward")
    with torch.no_grad():
        head.score.weight.normal_(generator=torch.Generator().manual_seed(7))
    model.save(path)
    return path


@pytest.fixture
def reward_dir(make_model, tmp_path) -> Path:
    return save_reward_model(make_model(seed=1), tmp_path / "rm")


def prompts(policy: mmpost.LMM):
    """Three prompts with two, one and no images."""
    samples = [
        Sample(
            id="two",
            messages=[{"role": "user", "content": "<image>\n<image>\nSame shapes?"}],
            media={"image": [png(0), png(1)]},
        ),
        Sample(
            id="one",
            messages=[{"role": "user", "content": "<image>\nHow many shapes are there?"}],
            media={"image": [png(2)]},
        ),
        Sample(id="none", messages=[{"role": "user", "content": "Say a colour."}], media={}),
    ]
    return make_batch(policy, samples, "prompt")


def completions(policy: mmpost.LMM, rows: int, length: int = 6) -> torch.Tensor:
    """``[rows, length]`` random tokens, each row ending at its own end-of-sequence token (or running to the end)."""
    tokens = torch.randint(5, 60, (rows, length), generator=torch.Generator().manual_seed(3))
    eos = min(eos_token_ids(policy))
    for row, end in enumerate([0, 2, 5, 1, 3, 4, 2, length, 0][:rows]):
        if end < length:
            tokens[row, end] = eos
    return tokens


def direct_scores(path: Path, ids: torch.Tensor, mask: torch.Tensor, media, group: int) -> torch.Tensor:
    """The loaded reward model's head value at each row's last attended token, from one forward of every row."""
    model = mmpost.load(path).eval()
    with torch.no_grad():
        values = model(ids, mask, media, media_repeat=group, head="reward").values  # [N, T]
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # [N]
    return values[torch.arange(len(ids)), last]


def test_scores_are_the_head_at_each_rows_last_token_in_batches_of_whole_groups(make_model, reward_dir):
    policy = make_model().eval()
    batch = prompts(policy)
    done = completions(policy, len(batch.ids) * GROUP)
    rewards = RewardSet(
        [{"name": "model", "path": str(reward_dir), "weight": 0.5, "kwargs": {"batch_size": 4}}, {"name": "format"}]
    )
    assert rewards.needs_rows
    rewards.bind(policy, "cpu")
    forwards = []
    model = rewards.fns[0].model
    model.register_forward_hook(lambda module, args, out: forwards.append(args[0].shape[0]))
    rollout = score(policy, batch, done, rewards, GROUP, functools.partial(group_advantages, scale=True))
    assert forwards == [GROUP, GROUP, GROUP]  # batch_size 4: one group of 3 rows per forward
    assert len(set(rollout.lengths.tolist())) > 2  # the rows end in different columns
    expected = direct_scores(reward_dir, rollout.input_ids, rollout.attention_mask, rollout.media, GROUP)
    got = rollout.per_function["model"]
    assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == (9,)
    assert (got - expected).abs().max() <= 1e-6
    assert expected.std() > 0.1  # the scores tell the rows apart
    torch.testing.assert_close(rollout.rewards, 0.5 * got + rollout.per_function["format"])


def test_rows_split_by_prompt_whatever_the_batch_size(make_model, reward_dir):
    policy = make_model().eval()
    batch = prompts(policy)
    done = completions(policy, len(batch.ids) * GROUP)
    rows = score(policy, batch, done, RewardSet([{"name": "format"}]), GROUP, group_advantages)
    rows = RewardRows(rows.input_ids, rows.attention_mask, rows.media, GROUP)
    expected = direct_scores(reward_dir, rows.input_ids, rows.attention_mask, rows.media, GROUP)
    for batch_size in (1, 6, 7, 32):  # fewer rows than a group, two groups, more than two, all
        reward = ModelReward(str(reward_dir), batch_size=batch_size)
        reward.bind(policy, "cpu")
        # float32 sums over padded batches of other shapes differ in the last bits (by 2e-6 on some CPUs)
        torch.testing.assert_close(reward(rows), expected, rtol=1e-5, atol=1e-5, msg=f"batch_size {batch_size}")


def test_the_bound_reward_model_is_frozen_in_the_policys_dtype(make_model, reward_dir):
    policy = make_model().to(torch.bfloat16)
    rewards = RewardSet([{"name": "model", "path": str(reward_dir)}])
    rewards.bind(policy, "cpu")
    model = rewards.fns[0].model
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.base_llm.dtype == torch.bfloat16


def checksums(folder: Path) -> dict[str, str]:
    return {
        str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.rglob("*") if f.is_file()
    }


def test_a_grpo_run_leaves_the_reward_model_as_it_was(after_sft, tmp_path, monkeypatch):
    from mmpost.cli import main
    from mmpost.training.metrics import read_metrics

    path = save_reward_model(mmpost.load(tmp_path / "sft" / "final"), tmp_path / "rm")  # the policy's tokenizer
    on_disk = checksums(path)
    bound = []
    bind = ModelReward.bind

    def recording(self, policy, device):
        bind(self, policy, device)
        bound.append(self.model)

    monkeypatch.setattr(ModelReward, "bind", recording)
    stage = {
        "name": "grpo",
        "group_size": 4,
        "max_completion_length": 4,
        "rewards": [{"name": "model", "path": str(tmp_path / "rm"), "kwargs": {"batch_size": 4}}],
    }
    defaults = {"data": {"train": {"path": "count.json"}}, "train": {"lr": 1e-2, "max_steps": 2, "batch_size": 2}}
    assert main(["train", str(after_sft("grpo", stage, defaults, data={"eval": None}))]) == 0
    lines = [r for r in read_metrics(tmp_path / "grpo") if "loss" in r]
    assert [r["step"] for r in lines] == [1, 2]
    assert all("reward/model/mean" in r and r["reward/model/std"] > 0 for r in lines)
    (model,) = bound
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    saved = mmpost.load(path).state_dict()
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())
    assert checksums(path) == on_disk
    policy = mmpost.load(tmp_path / "grpo" / "final").state_dict()
    assert any(not torch.equal(policy[k], saved[k]) for k in policy if "layers" in k)  # the policy did train


def test_a_reward_model_with_another_tokenizer_is_refused(make_model, tmp_path):
    other = make_model(seed=1)
    other.tokenizer.add_tokens(["<a_token_the_policy_lacks>"])
    path = save_reward_model(other, tmp_path / "other_rm")
    rewards = RewardSet([{"name": "model", "path": str(path)}])
    with pytest.raises(RewardError) as e:
        rewards.bind(make_model(), "cpu")
    message = str(e.value)
    assert str(path) in message and "different tokenizer" in message and "<a_token_the_policy_lacks>" in message
    assert "policy's token ids" in message


def test_a_reward_model_without_an_encoder_for_the_policys_media_is_refused(llm_dir, make_model, tmp_path):
    path = save_reward_model(mmpost.LMM(llm=str(llm_dir)), tmp_path / "text_rm")
    rewards = RewardSet([{"name": "model", "path": str(path)}])
    with pytest.raises(RewardError, match=r"text_rm has no encoder for image"):
        rewards.bind(make_model(), "cpu")


def test_a_model_without_a_reward_head_is_refused_at_start(make_model, tmp_path):
    make_model().save(tmp_path / "plain")
    with pytest.raises(RewardError, match=r"plain has no reward head.*stage: rm"):
        RewardSet([{"name": "model", "path": str(tmp_path / "plain")}])


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"name": "model"}, "needs a `path`"),
        ({"name": "accuracy", "path": "runs/rm"}, r"'accuracy': `path` names a reward model"),
        ({"name": "model", "path": "no/such/run"}, r"no/such/run is not a run directory"),
        ({"name": "model", "path": "RM", "kwargs": {"batchsize": 4}}, r"unknown kwargs \['batchsize'\]"),
        ({"name": "model", "path": "RM", "kwargs": {"batch_size": 0}}, "batch_size must be a positive integer"),
    ],
)
def test_bad_reward_model_entries(reward_dir, entry, message):
    if entry.get("path") == "RM":
        entry = {**entry, "path": str(reward_dir)}
    with pytest.raises(RewardError, match=message):
        RewardSet([entry])


def test_a_reward_model_scores_only_rows_once_bound(make_model, reward_dir):
    rewards = RewardSet([{"name": "model", "path": str(reward_dir)}])
    rows = RewardRows(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long), {}, 1)
    with pytest.raises(RewardError, match="not loaded.*bind"):
        rewards(["a", "b"], [{"id": "x"}, {"id": "y"}], rows)
    rewards.bind(make_model(), "cpu")
    with pytest.raises(RewardError, match="pass rows="):
        rewards(["a", "b"], [{"id": "x"}, {"id": "y"}])
    with pytest.raises(RewardError, match="3 completions but 2 token rows"):
        rewards(["a", "b", "c"], [{"id": "x"}, {"id": "y"}, {"id": "z"}], rows)


def test_a_non_finite_score_names_the_sample(make_model, tmp_path):
    model = make_model()
    add_head(model, "reward")
    with torch.no_grad():
        model.heads["reward"].score.weight.fill_(float("nan"))
    model.save(tmp_path / "nan_rm")
    rewards = RewardSet([{"name": "model", "path": str(tmp_path / "nan_rm")}])
    rewards.bind(make_model(), "cpu")
    rows = RewardRows(torch.full((2, 3), 5), torch.ones(2, 3, dtype=torch.long), {}, 2)
    with pytest.raises(RewardError, match=r"scored sample 'p0' nan; a reward must be a finite number"):
        rewards(["a", "b"], [{"id": "p0"}, {"id": "p1"}], rows)
