"""The label tokens' cross-entropy from the hidden states in chunks (``mmpost.losses.chunked_ce``): the loss and
both gradients equal the plain logits' and ``F.cross_entropy``'s, in one chunk or many, with either input frozen,
under autocast; the LMM's forward returns it for sft, with every parameter's gradient equal to the plain path's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmpost.data.pipeline import ConversationPipeline
from mmpost.losses import chunked_ce
from mmpost.losses.ce import cross_entropy_sum
from mmpost.losses.chunked_ce import is_plain_head, linear_cross_entropy_sum
from tests.test_packing import conversations


def inputs(n=37, d=24, v=301, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) * 0.3
    return hidden, weight, torch.randint(0, v, (n,), generator=g)


def grads(fn, hidden, weight, targets, need=(True, True), scale=1.0):
    h = hidden.clone().requires_grad_(need[0])
    w = weight.clone().requires_grad_(need[1])
    loss = fn(h, w, targets)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


def plain(h, w, t):
    return F.cross_entropy(h @ w.t(), t, reduction="sum")


@pytest.mark.parametrize("rows", [1000, 8, 1], ids=["one-chunk", "chunks-of-8", "row-by-row"])
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)], ids=["both", "frozen-head", "head"])
def test_loss_and_gradients_equal_the_plain_logits(monkeypatch, rows, need):
    monkeypatch.setattr(chunked_ce, "CHUNK_BYTES", rows * 4 * 301)
    assert chunked_ce.chunk_rows(301) == rows
    hidden, weight, targets = inputs()
    ours = grads(linear_cross_entropy_sum, hidden, weight, targets, need, scale=2.5)
    theirs = grads(plain, hidden, weight, targets, need, scale=2.5)
    assert ours[0].dtype == torch.float32
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    for a, b, wanted in zip(ours[1:], theirs[1:], need, strict=True):
        assert (a is not None) == wanted
        if wanted:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_without_gradients_and_without_label_tokens():
    hidden, weight, targets = inputs()
    with torch.no_grad():
        assert linear_cross_entropy_sum(hidden, weight, targets) == pytest.approx(float(plain(hidden, weight, targets)))
    loss, h_grad, w_grad = grads(linear_cross_entropy_sum, hidden[:0], weight, targets[:0])
    assert float(loss) == 0.0 and h_grad.shape == (0, 24) and not w_grad.any()


def test_under_autocast_the_head_runs_in_the_autocast_dtype():
    hidden, weight, targets = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = grads(linear_cross_entropy_sum, hidden, weight, targets)
        theirs = grads(lambda h, w, t: cross_entropy_sum(F.linear(h, w), t), hidden, weight, targets)
    far = grads(plain, hidden, weight, targets)  # float32 throughout
    assert ours[0] == pytest.approx(float(theirs[0]), rel=1e-3) and abs(float(ours[0] - far[0])) > 1e-4
    for a, b in zip(ours[1:], theirs[1:], strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.02)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_the_forward_gives_the_plain_loss_and_every_gradient(make_model, one_thread, packing):
    """The tiny Llama ties its embedding and LM head, so the head's gradient meets the embedding's."""
    model = make_model("mlp").train()
    assert model.base_llm.get_output_embeddings().weight is model.base_llm.get_input_embeddings().weight
    pipeline = ConversationPipeline.for_model(model, 512, packing=packing)
    batch = pipeline.collate([pipeline.process(s) for s in conversations()])
    results = []
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        out = model(
            batch.input_ids, batch.attention_mask, batch.media, batch.labels, segments=batch.segments,
            cross_entropy=fused,
        )  # fmt: skip
        loss = out.cross_entropy if fused else cross_entropy_sum(out.logits, out.targets)
        assert (out.logits is None) == fused
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss, ours), (plain_loss, theirs) = results
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-5)
    assert ours.keys() == theirs.keys() and any("embed_tokens" in n for n in ours)
    for name, grad in theirs.items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_head_that_is_not_a_plain_linear_takes_the_logits_path(make_model, one_thread):
    model = make_model("mlp").eval()
    head = model.base_llm.get_output_embeddings()
    calls = []
    handle = head.register_forward_hook(lambda *_: calls.append(1))  # the chunked path never calls the module
    hidden, targets = torch.randn(5, head.in_features), torch.arange(5)
    with torch.no_grad():
        chunked = model.label_cross_entropy(hidden, targets)
        assert not calls
        model.base_llm.config.final_logit_softcapping = 30.0
        capped = model.label_cross_entropy(hidden, targets)
        assert calls
        logits = head(hidden)
        expected = cross_entropy_sum(torch.tanh(logits / 30.0) * 30.0, targets)
    handle.remove()
    assert float(capped) == pytest.approx(float(expected), rel=1e-6)
    assert float(chunked) == pytest.approx(float(cross_entropy_sum(logits, targets)), rel=1e-6)


def test_a_head_whose_weight_is_sharded_or_has_a_bias_runs_as_a_module():
    head = torch.nn.Linear(4, 6, bias=False)
    assert is_plain_head(head) and not is_plain_head(torch.nn.Linear(4, 6))
    head.weight.ds_id = 3  # a DeepSpeed ZeRO-3 parameter: gathered only while the module runs
    assert not is_plain_head(head)
