"""Rows that share their prompt, computed with the prompt once (``share_prompt``), give the logits, targets and
gradients of the rows computed one by one: preference pairs and GRPO groups, every connector kind, LoRA, M-RoPE."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from helpers import make_batch
from PIL import Image

import mmpost
from mmpost.config.schema import LoraConfig
from mmpost.interfaces import IGNORE
from mmpost.model.lora import add_lora
from mmpost.model.shared_prompt import shared_layout
from mmpost.synthetic.tiny_released import make_tiny_qwen2_vl

QUESTIONS = ["What colour is the shape?", "How many shapes are there in this picture?", "Shape?"]


def png(seed: int, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def pairs(n: int = 3):
    from mmpost.data.sample import Sample

    return [
        Sample(
            id=str(i),
            messages=[{"role": "user", "content": "<image>\n" + QUESTIONS[i % 3]}],
            media={"image": [png(i)]},
            meta={"chosen": "a red circle " * (i + 1), "rejected": "blue"},
        )
        for i in range(n)
    ]


def group_rows(model, group: int = 3, seed: int = 0):
    """GRPO's layout: each left-padded prompt repeated ``group`` times, then a completion of its own length
    (padded on the right), labelled on the completion."""
    from mmpost.data.sample import Sample

    prompts = make_batch(
        model,
        [
            Sample(id=str(i), messages=[{"role": "user", "content": "<image>\n" + q}], media={"image": [png(i)]})
            for i, q in enumerate(QUESTIONS[:2])
        ],
        "prompt",
    )
    gen = torch.Generator().manual_seed(seed)
    rows = prompts.input_ids.shape[0] * group
    length = 7
    completions = torch.randint(5, 60, (rows, length), generator=gen)
    lengths = torch.tensor([length, 3, 1, 5, length, 2][:rows])
    done = torch.arange(length)[None, :] < lengths[:, None]
    pad = model.tokenizer.pad_token_id
    ids = torch.cat([prompts.input_ids.repeat_interleave(group, 0), completions.masked_fill(~done, pad)], 1)
    mask = torch.cat([prompts.attention_mask.repeat_interleave(group, 0), done.long()], 1)
    labels = torch.cat([torch.full_like(prompts.input_ids.repeat_interleave(group, 0), IGNORE), completions], 1)
    return ids, mask, labels.masked_fill(mask == 0, IGNORE), prompts.media


def assert_same(model, ids, mask, media, labels, group):
    plain = model(ids, mask, media, labels, media_repeat=group)
    shared = model(ids, mask, media, labels, media_repeat=group, share_prompt=True)
    assert torch.equal(shared.kept, plain.kept) and torch.equal(shared.targets, plain.targets)
    assert (shared.logits - plain.logits).abs().max() <= 1e-5
    assert plain.logits.abs().max() > 0.1
    return plain, shared


def test_the_layout_holds_each_prompt_once_and_every_answer_in_its_slot(make_model):
    model = make_model("mlp")
    batch = make_batch(model, pairs(), "pair")
    layout = shared_layout(batch.input_ids, batch.attention_mask, batch.labels, 2, set(model.placeholder_ids.values()))
    assert layout.real.shape[0] == 3  # one row per pair
    prompt_tokens = int((layout.segment == 0).sum())
    rows_tokens = int(batch.attention_mask.sum())
    assert int(layout.real.sum()) == rows_tokens - prompt_tokens  # each prompt once instead of twice
    assert layout.predictors.numel() == int((batch.labels[:, 1:] != IGNORE).sum())


@pytest.mark.parametrize("connector", ["mlp", "qformer", "resampler", "xattn"])
def test_preference_pairs_share_their_prompt_for_every_connector(make_model, connector):
    options = {
        "qformer": {"num_queries": 4, "hidden_size": 32, "layers": 1, "heads": 2},
        "resampler": {"num_latents": 4, "layers": 1, "heads": 4},
        "xattn": {"every": 1, "heads": 4, "num_latents": 4, "resampler_layers": 1, "resampler_heads": 4},
    }.get(connector, {})
    model = make_model(connector, **options).eval()
    if connector == "xattn":  # open the gates, or the blocks add nothing to compare
        with torch.no_grad():
            for name, p in model.connectors["image"].named_parameters():
                if "gate" in name:
                    p.fill_(0.5)
    batch = make_batch(model, pairs(), "pair")
    with torch.no_grad():
        assert_same(model, batch.input_ids, batch.attention_mask, batch.media, batch.labels, 2)


def test_grpo_groups_share_their_prompt_with_lora_and_give_the_same_gradients(make_model):
    model = make_model("mlp")
    model.llm = add_lora(model.llm, LoraConfig(r=4))
    model.eval()  # no dropout: both passes compute the same function
    with torch.no_grad():  # adapters that move the output
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    ids, mask, labels, media = group_rows(model)
    grads = []
    for share in (False, True):
        model.zero_grad()
        out = model(ids, mask, media, labels, media_repeat=3, share_prompt=share)
        torch.log_softmax(out.logits, -1).gather(-1, out.targets[:, None]).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 4
    for name in grads[0]:
        assert (grads[0][name] - grads[1][name]).abs().max() <= 1e-5 * max(1.0, grads[0][name].abs().max()), name
    with torch.no_grad():
        assert_same(model, ids, mask, media, labels, 3)


def test_m_rope_positions_follow_each_answer_in_the_shared_layout(tmp_path):
    model = mmpost.from_pretrained(str(make_tiny_qwen2_vl(tmp_path / "qwen2_vl"))).eval()
    batch = make_batch(model, pairs(2), "pair")
    with torch.no_grad():
        assert_same(model, batch.input_ids, batch.attention_mask, batch.media, batch.labels, 2)


def test_rows_that_differ_before_their_labels_are_computed_as_they_are(make_model):
    model = make_model("mlp").eval()
    batch = make_batch(model, pairs(), "pair")
    ids = batch.input_ids.clone()
    first_real = batch.attention_mask[1].nonzero()[0, 0]
    ids[1, first_real] = (ids[1, first_real] + 1) % 50  # the second row of the first pair has another prompt
    assert shared_layout(ids, batch.attention_mask, batch.labels, 2, set(model.placeholder_ids.values())) is None
    with torch.no_grad():
        assert_same(model, ids, batch.attention_mask, batch.media, batch.labels, 2)
