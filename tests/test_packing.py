"""Packed batches (``data.packing``): several conversations per row, each seeing only itself and its own media,
give every sample the loss it has alone in its row; a run packed learns the same curve as one padded."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mmpost.cli import main
from mmpost.data.pipeline import ConversationPipeline, first_fit_decreasing
from mmpost.data.sample import Sample
from mmpost.interfaces import IGNORE
from mmpost.training.metrics import read_metrics

CONNECTORS = {
    "mlp": {},
    "qformer": {"num_queries": 4, "hidden_size": 32, "layers": 1, "heads": 2},
    "xattn": {"every": 1, "heads": 4, "num_latents": 4, "resampler_layers": 1, "resampler_heads": 4},
}


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def conversations(n: int = 6) -> list[Sample]:
    """Conversations of different lengths, some with one image, one with two, one with none."""
    out = []
    for i in range(n):
        images = [png(i)] * (2 if i == 1 else 0 if i == 4 else 1)
        prefix = "".join("<image>\n" for _ in images)
        answer = "a red circle and a blue square " * (1 + i % 3)
        messages = [
            {"role": "user", "content": prefix + "Describe it. " * (i + 1)},
            {"role": "assistant", "content": answer},
        ]
        out.append(Sample(id=str(i), messages=messages, media={"image": images} if images else {}))
    return out


def per_sample_loss(model, batch) -> torch.Tensor:
    """Summed cross-entropy of each sample, in ``batch.ids`` order."""
    out = model(batch.input_ids, batch.attention_mask, batch.media, batch.labels, segments=batch.segments)
    losses = torch.nn.functional.cross_entropy(out.logits, out.targets, reduction="none")
    owner = torch.arange(out.kept.shape[0])[:, None].expand_as(out.kept)  # the row of each position
    if batch.segments is not None:  # the sample of a target is the segment of the token it is
        owner = owner * 1000 + batch.segments[:, 1:]
    keys = owner[out.kept]
    return torch.stack([losses[keys == key].sum() for key in torch.unique_consecutive(keys)])


def test_first_fit_decreasing_fills_rows_up_to_the_capacity():
    bins = first_fit_decreasing([5, 3, 8, 2, 4, 9], 10)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum([5, 3, 8, 2, 4, 9][i] for i in b) <= 10 for b in bins)
    assert len(bins) == 4 and first_fit_decreasing([12], 10) == [[0]]  # too long: a row of its own


@pytest.mark.parametrize("connector", sorted(CONNECTORS))
def test_each_packed_sample_has_the_loss_it_has_alone(make_model, connector):
    model = make_model(connector, **CONNECTORS[connector]).eval()
    if connector == "xattn":  # open the gates, so that a medium seen by the wrong sample would show
        with torch.no_grad():
            for name, p in model.connectors["image"].named_parameters():
                if "gate" in name:
                    p.fill_(0.5)
    samples = conversations()
    padded = ConversationPipeline.for_model(model, 512)
    packed = ConversationPipeline.for_model(model, 512, packing=True)
    plain = padded.collate([padded.process(s) for s in samples])
    batch = packed.collate([packed.process(s) for s in samples])
    assert batch.input_ids.shape[0] < plain.input_ids.shape[0]  # fewer rows
    assert batch.label_tokens() == plain.label_tokens() and sorted(batch.ids) == sorted(plain.ids)
    assert int(batch.attention_mask.sum()) == int(plain.attention_mask.sum())
    with torch.no_grad():
        ours = dict(zip(batch.ids, per_sample_loss(model, batch).tolist(), strict=True))
        theirs = dict(zip(plain.ids, per_sample_loss(model, plain).tolist(), strict=True))
    for sample_id, loss in theirs.items():
        assert ours[sample_id] == pytest.approx(loss, abs=1e-5 * max(1.0, abs(loss)))


def test_a_packed_sft_run_learns_the_same_curve(run_config, tmp_path):
    curves = []
    for packing in (False, True):
        name = f"sft-{packing}"
        cfg = run_config(
            name,
            stage="sft",
            data={"packing": packing, "num_workers": 0},
            train={"max_steps": 6, "batch_size": 6, "log_every": 1, "lr": 2e-3},
        )
        assert main(["train", str(cfg)]) == 0
        curves.append([r["loss"] for r in read_metrics(tmp_path / name) if "loss" in r])
    assert len(curves[0]) == 6 and curves[0][-1] < curves[0][0]
    assert curves[1] == pytest.approx(curves[0], abs=1e-4)


def test_packing_is_refused_for_a_model_with_its_own_positions(tmp_path):
    import mmpost
    from mmpost.synthetic.tiny_released import make_tiny_qwen2_vl

    model = mmpost.from_pretrained(str(make_tiny_qwen2_vl(tmp_path / "q")))
    pipeline = ConversationPipeline.for_model(model, 512, packing=True)
    batch = pipeline.collate([pipeline.process(s) for s in conversations(3)])
    with pytest.raises(ValueError, match="M-RoPE"):
        model(batch.input_ids, batch.attention_mask, batch.media, batch.labels, segments=batch.segments)
    assert (batch.labels[:, 1:] != IGNORE).any()


def test_segmented_attention_equals_a_block_diagonal_mask():
    """Attention sample by sample over one row equals the dense computation with a block-diagonal causal mask,
    grouped-query heads included; without the bounds it refuses instead of attending across samples."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from mmpost.model.segments import FlatRow, segmented_attention

    torch.manual_seed(0)
    segments = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    row = FlatRow.of(segments)
    assert row.segments.tolist() == [[1, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3]] and row.bounds.tolist() == [0, 3, 5, 11]
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    query, key, value = torch.randn(1, 4, 11, 8), torch.randn(1, 2, 11, 8), torch.randn(1, 2, 11, 8)
    ours, _ = segmented_attention(module, query, key, value, None, scaling=0.3, **row.attention_kwargs())
    flat = row.segments[0]
    allowed = torch.ones(11, 11, dtype=torch.bool).tril() & (flat[:, None] == flat[None, :])
    theirs, _ = sdpa_attention_forward(module, query, key, value, allowed[None, None], scaling=0.3)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    hidden = torch.randn(2, 6, 3)
    assert torch.equal(row.unflatten(row.flatten(hidden)), hidden * (segments > 0)[..., None])
    with pytest.raises(RuntimeError, match="data.packing: false"):
        segmented_attention(module, query, key, value, None)
