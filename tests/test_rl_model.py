"""What the preference and RL stages need from the LMM, for every connector kind: shared-prefill sampling
gives the tokens of naive G-fold sampling, media reused across a group of rows give the logits of
repeated media, and label log-probs equal a log-softmax of the full logits."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import make_batch
from test_connectors import KINDS, build

from mmpost.data.batches import PairBatch
from mmpost.data.sources import read_records
from mmpost.losses.ce import label_logprobs


@pytest.fixture(scope="module")
def questions(synth_dir):
    return read_records(synth_dir / "heldout.jsonl", image_root=synth_dir / "images")[:3]


def repeat_media(media, r):
    return {m: torch.repeat_interleave(x, r, dim=0) for m, x in media.items()}


@pytest.mark.parametrize("kind", list(KINDS))
def test_shared_prefill_samples_the_tokens_of_g_fold_prefill(make_model, questions, kind):
    model = build(make_model, kind)
    model.base_llm.generation_config.eos_token_id = None  # run every step
    batch = make_batch(model, questions, kind="reference")
    args = (batch.input_ids, batch.attention_mask, batch.media)
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
    ids = batch.input_ids.repeat_interleave(2, dim=0)
    mask = batch.attention_mask.repeat_interleave(2, dim=0)
    hidden_shared = model.hidden_states(ids, mask, batch.media, media_repeat=2)
    hidden_repeated = model.hidden_states(ids, mask, repeat_media(batch.media, 2))
    torch.testing.assert_close(hidden_shared, hidden_repeated, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["mlp", "xattn"])
def test_token_logprobs_are_the_log_softmax_at_label_positions(make_model, questions, kind):
    model = build(make_model, kind)
    batch = make_batch(model, questions)
    ids, mask, labels = batch.input_ids, batch.attention_mask, batch.labels
    out = model(ids, mask, batch.media, labels)
    logps = label_logprobs(out.logits, out.targets, out.kept, temperature=0.7)
    full = (model(ids, mask, batch.media).dense().float() / 0.7).log_softmax(-1)[:, :-1]  # [B, T-1, V]
    targets = labels[:, 1:]
    keep = targets != -100
    expected = full.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
    torch.testing.assert_close(logps, expected, rtol=0, atol=1e-5)
    assert (logps[~keep] == 0).all() and (logps[keep] < 0).all()


def test_generate_never_emits_a_media_placeholder(make_model, questions):
    model = build(make_model, "mlp")
    image_id = model.placeholder_ids["image"]
    with torch.no_grad():  # make the placeholder the most likely next token everywhere
        model.base_llm.get_output_embeddings().bias = torch.nn.Parameter(
            torch.zeros(model.base_llm.config.vocab_size).index_fill_(0, torch.tensor([image_id]), 1e4)
        )
    batch = make_batch(model, questions, kind="reference")
    for share in (True, False):
        out = model.generate(
            batch.input_ids,
            batch.attention_mask,
            batch.media,
            max_new_tokens=4,
            num_samples=2,
            share_prefill=share,
            do_sample=True,
        )
        assert not (out == image_id).any()


@pytest.mark.parametrize("kind", list(KINDS))
def test_dpo_and_grpo_losses_reach_every_connector_kind(make_model, synth_dir, kind):
    from mmpost.losses.dpo import preference_loss
    from mmpost.losses.grpo import policy_loss
    from mmpost.rewards import RewardSet
    from mmpost.stages.grpo.rollout import sample_and_score

    model = build(make_model, kind)
    images = synth_dir / "images"
    pairs = make_batch(model, read_records(synth_dir / "pairs.json", image_root=images)[:3], kind="pair")
    assert isinstance(pairs, PairBatch) and pairs.pairs == 3  # two rows per sample: chosen, rejected
    assert pairs.input_ids.shape[0] == 6
    out = model(pairs.input_ids, pairs.attention_mask, pairs.media, pairs.labels, media_repeat=2)
    logps = label_logprobs(out.logits, out.targets, out.kept).sum(-1)
    tokens = (pairs.labels[:, 1:] != -100).sum(-1)
    ref = logps.detach() - 0.1
    loss = preference_loss(logps[0::2], logps[1::2], ref[0::2], ref[1::2], tokens[0::2], tokens[1::2]).losses.sum()
    prompts = make_batch(model, read_records(synth_dir / "count.json", image_root=images)[:2], kind="prompt")
    rollout = sample_and_score(model, prompts, RewardSet([{"name": "accuracy"}]), 3, 3, 1.0, 1.0, True, True)
    assert rollout.input_ids.shape[0] == 6 and len(rollout.texts) == 6
    out = model(rollout.input_ids, rollout.attention_mask, rollout.media, rollout.labels, media_repeat=3)
    new = label_logprobs(out.logits, out.targets, out.kept)
    mask = (rollout.labels[:, 1:] != -100).float()
    loss = loss + policy_loss(new, new.detach(), rollout.advantages + 1.0, mask).loss
    loss.backward()
    connector_grads = [p.grad for p in model.connectors["image"].parameters() if p.grad is not None]
    assert connector_grads and any(g.abs().sum() > 0 for g in connector_grads)


@pytest.mark.parametrize("kind", ["mlp", "xattn"])
def test_a_steps_micro_batches_sampled_in_one_call_continue_as_each_alone(make_model, synth_dir, kind):
    from mmpost.stages.grpo.rollout import merged_prompts

    model = build(make_model, kind).eval()
    records = read_records(synth_dir / "count.json", image_root=synth_dir / "images")
    longer = [
        dataclasses.replace(r, messages=[{**r.messages[0], "content": r.messages[0]["content"] + " Count well."}])
        for r in records[2:5]
    ]
    micro = [make_batch(model, records[:2], kind="prompt"), make_batch(model, longer, kind="prompt")]
    assert micro[0].input_ids.shape[1] < micro[1].input_ids.shape[1]  # merged, the first is padded further
    ids, mask, media = merged_prompts(micro, model.tokenizer.pad_token_id)
    with torch.no_grad():
        together = model.generate(ids, mask, media, max_new_tokens=4, num_samples=2)
        alone = [model.generate(b.input_ids, b.attention_mask, b.media, max_new_tokens=4, num_samples=2) for b in micro]
    width = together.shape[1]
    alone = torch.cat(
        [torch.nn.functional.pad(a, (0, width - a.shape[1]), value=model.tokenizer.pad_token_id) for a in alone]
    )
    assert together.shape[0] == 10 and torch.equal(together, alone)
