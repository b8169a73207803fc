"""What the preference and RL stages need from the LMM, for every connector kind: shared-prefill sampling
gives the tokens of naive G-fold sampling, media reused across a group of rows give the logits of
repeated media, and label log-probs equal a log-softmax of the full logits."""

from __future__ import annotations

import pytest
import torch
from helpers import make_batch
from test_connectors import KINDS, build

from mmpost.data.sources import read_records


@pytest.fixture(scope="module")
def questions(synth_dir):
    return read_records(synth_dir / "heldout.jsonl", image_root=synth_dir / "images")[:3]


def repeat_media(media, r):
    return {m: torch.repeat_interleave(x, r, dim=0) for m, x in media.items()}


@pytest.mark.parametrize("kind", list(KINDS))
def test_shared_prefill_samples_the_tokens_of_g_fold_prefill(make_model, questions, kind):
    model = build(make_model, kind)
    model.base_llm.generation_config.eos_token_id = None  # run every step
    batch = make_batch(model, questions, mode="generate")
    args = (batch["input_ids"], batch["attention_mask"], batch["media"])
    shared = model.generate(*args, max_new_tokens=6, num_samples=4, share_prefill=True)
    naive = model.generate(*args, max_new_tokens=6, num_samples=4, share_prefill=False)
    single = model.generate(*args, max_new_tokens=6)
    assert shared.shape == (3 * 4, 6)
    assert torch.equal(shared, naive)
    assert torch.equal(shared[::4], single)  # greedy: every sample of a prompt is its one greedy answer
    torch.manual_seed(0)
    sampled = model.generate(*args, max_new_tokens=6, num_samples=4, do_sample=True, temperature=1.5)
    torch.manual_seed(0)
    again = model.generate(*args, max_new_tokens=6, num_samples=4, do_sample=True, temperature=1.5)
    assert torch.equal(sampled, again)
    assert any(not torch.equal(sampled[i], sampled[i + 1]) for i in range(0, 12, 4))  # samples differ


@pytest.mark.parametrize("kind", list(KINDS))
def test_media_shared_by_a_group_of_rows_equal_repeated_media(make_model, questions, kind):
    model = build(make_model, kind)
    batch = make_batch(model, questions)
    ids = batch["input_ids"].repeat_interleave(2, dim=0)
    mask = batch["attention_mask"].repeat_interleave(2, dim=0)
    hidden_shared = model.hidden_states(ids, mask, batch["media"], media_repeat=2)
    hidden_repeated = model.hidden_states(ids, mask, repeat_media(batch["media"], 2))
    torch.testing.assert_close(hidden_shared, hidden_repeated, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["mlp", "xattn"])
def test_token_logprobs_are_the_log_softmax_at_label_positions(make_model, questions, kind):
    model = build(make_model, kind)
    batch = make_batch(model, questions)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    logps = model.token_logprobs(ids, mask, batch["media"], labels, temperature=0.7)
    full = (model(ids, mask, batch["media"]).float() / 0.7).log_softmax(-1)[:, :-1]  # [B, T-1, V]
    targets = labels[:, 1:]
    keep = targets != -100
    expected = full.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
    torch.testing.assert_close(logps, expected, rtol=0, atol=1e-5)
    assert (logps[~keep] == 0).all() and (logps[keep] < 0).all()
