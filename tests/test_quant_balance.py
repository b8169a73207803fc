"""Balanced searches: each block's token weights are the answer loss's squared gradient there (by token, or its
modality's mean), the searches measure a token's error by them, and SmoothQuant's α can be searched."""

from __future__ import annotations

import pytest
import torch

from mmpost.model.quantized import ActivationScheme, WeightScheme, selected_linears
from mmpost.quant import QuantizeOptions, load_options, quantize
from mmpost.quant.calibrate import calibration_batches, layer_inputs
from mmpost.quant.sensitivity import token_weights
from mmpost.quant.smooth import ALPHA_GRID, _mse, mappings, smoothquant_scales, smoothquant_search
from tests.test_quant import spread


def _blocks(model):
    layers = model.base_llm.model.layers
    return [m for layer in layers for m in (layer.self_attn, layer.mlp)]


def _reference_squared(model, batches, blocks):
    """The squared gradient norms the plain way: every parameter trainable, ``retain_grad`` on each block's output;
    per block, per batch ``[B, T]``; and per batch the real-token and media-token masks."""
    placeholder = torch.tensor(list(model.placeholder_ids.values()))
    outs = {}

    def keep(i):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            out.retain_grad()
            outs[i] = out

        return hook

    handles = [b.register_forward_hook(keep(i)) for i, b in enumerate(blocks)]
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    squared, masks = [[] for _ in blocks], []
    try:
        for p in model.parameters():
            p.requires_grad_(True)
        for batch in batches:
            with torch.enable_grad():
                out = model(batch.input_ids, batch.attention_mask, batch.media, batch.labels)
                torch.nn.functional.cross_entropy(out.logits, out.targets, reduction="sum").backward()
            real = batch.attention_mask.bool()
            masks.append((real, torch.isin(batch.input_ids, placeholder) & real))
            for i in range(len(blocks)):
                squared[i].append(outs[i].grad.double().pow(2).sum(-1))
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(trainable[n])
        model.zero_grad(set_to_none=True)
    return squared, masks


@pytest.mark.parametrize("by", ["modality", "token"])
def test_weights_are_the_squared_gradient_scaled_to_average_one(make_model, calib, by):
    model = spread(make_model("mlp"))
    batches = calibration_batches(model, calib, 8, 4, 1024)
    blocks = _blocks(model)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    got = token_weights(model, batches, blocks, by)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())
    squared, masks = _reference_squared(model, batches, blocks)
    real = torch.cat([m[0].flatten() for m in masks])
    media = torch.cat([m[1].flatten() for m in masks])
    assert 0 < int(media.sum()) < int(real.sum())
    for i, block in enumerate(blocks):
        values = torch.cat([s.flatten() for s in squared[i]])
        if by == "modality":
            values = torch.where(media, values[media].mean(), values[real & ~media].mean())
        expected = values * real / values[real].mean()
        weights = torch.cat([w.flatten() for w in got[id(block)].rows]).double()
        assert torch.allclose(weights, expected, rtol=1e-4, atol=1e-7)
        assert float(weights[real].mean()) == pytest.approx(1.0, rel=1e-5)
        assert got[id(block)].media == pytest.approx(float(expected[media].mean()), rel=1e-4)
    # the answer depends on a media token's block outputs less than on a text token's
    first = got[id(blocks[0])]
    assert first.media < first.text


def test_text_calibration_gives_every_token_weight_one_by_modality(make_model, calib):
    model = spread(make_model("mlp"))
    batches = calibration_batches(model, calib, 4, 4, 1024, text=True)
    weights = token_weights(model, batches, _blocks(model), "modality")
    for w in weights.values():
        assert all(torch.equal(r, b.attention_mask.float()) for r, b in zip(w.rows, batches, strict=True))
    report = quantize(model, load_options("w4a16-awq", num_samples=4, calibration="text", balance="modality"), calib)
    assert report.modality_weights == {} and "balanced" not in report.scheme
    by_token = quantize(
        spread(make_model("mlp")), load_options("w4a16-awq", num_samples=4, calibration="text", balance="token"), calib
    )
    assert "token-balanced" in by_token.scheme and by_token.modality_weights


def test_weighted_error_counts_each_token_by_its_weight():
    ref = torch.randn(2, 5, 3)
    out = ref + torch.randn(2, 5, 3)
    keep = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    weights = torch.rand(2, 5)
    squared = (ref - out).pow(2).sum(-1)
    plain = float(squared[keep].sum()) / (7 * 3)
    assert _mse([(ref, keep)], [(out, keep)]) == pytest.approx(plain)
    weighted = float((squared * weights)[keep].sum()) / (7 * 3)
    assert _mse([(ref, keep)], [(out, keep)], [weights]) == pytest.approx(weighted)
    assert _mse([(ref, keep)], [(out, keep)], [torch.full((2, 5), 2.0)]) == pytest.approx(2 * plain)


def test_balanced_awq_weighs_the_media_tokens_by_their_sensitivity(make_model, calib):
    """The balanced search runs on weights that differ from 1 and picks scales of its own; unbalanced is AWQ's."""
    balanced, plain = spread(make_model("mlp")), spread(make_model("mlp"))
    options = QuantizeOptions(bits=4, group_size=32, method="awq", num_samples=16, balance="modality")
    report = quantize(balanced, options, calib)
    plain_report = quantize(plain, QuantizeOptions(**{**options.__dict__, "balance": "none"}), calib)
    assert "modality-balanced" in report.scheme and plain_report.modality_weights == {}
    assert "media_vs_text_weight" not in plain_report.summary()
    ratios = sorted(w["media"] / w["text"] for w in report.modality_weights.values())
    assert report.summary()["media_vs_text_weight"] == ratios[len(ratios) // 2]
    weights = report.modality_weights["model.layers.0.self_attn"]
    assert weights["media"] != pytest.approx(1.0, rel=0.05) and weights["text"] != pytest.approx(1.0, rel=0.05)
    assert all(s["error"] <= s["rtn"] for s in report.smoothing.values())
    w_b = balanced.base_llm.model.layers[0].self_attn.q_proj.weight
    w_p = plain.base_llm.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(w_b, w_p)


def _first_pair(model, calib):
    linears = selected_linears(model.base_llm, ["lm_head"])
    layer = model.base_llm.model.layers[0]
    pair = mappings(layer, "model.layers.0", linears)[0]
    batches = calibration_batches(model, calib, 8, 4, 1024)
    stats, cached = layer_inputs(model, batches, layer, {pair.names[0]: pair.balance[0]}, [pair.parent])
    return pair, stats[pair.names[0]], cached[0]


def test_alpha_search_keeps_the_best_alpha_and_leaves_the_weights_as_they_were(make_model, calib, monkeypatch):
    model = spread(make_model("mlp"))
    pair, stats, replay = _first_pair(model, calib)
    originals = [layer.weight.clone() for layer in pair.balance]
    scheme, activations = WeightScheme(bits=8, group_size=None), ActivationScheme()
    found = smoothquant_search(pair, stats.abs_max, replay.replay, scheme, activations)
    assert all(torch.equal(w, layer.weight) for w, layer in zip(originals, pair.balance, strict=True))
    assert found.alpha in ALPHA_GRID
    assert torch.allclose(found.scales, smoothquant_scales(pair, stats.abs_max, found.alpha))
    assert found.error <= found.unsmoothed_error
    # a grid of one α gives that α's error: none of these does better than the search's choice
    for alpha in (0.25, 0.5, 0.75):
        monkeypatch.setattr("mmpost.quant.smooth.ALPHA_GRID", (alpha,))
        single = smoothquant_search(pair, stats.abs_max, replay.replay, scheme, activations)
        assert single.alpha == alpha and found.error <= single.error + 1e-12


def test_searched_smoothquant_is_a_w8a8_export_like_any_other(make_model, calib):
    model = spread(make_model("mlp"))
    report = quantize(model, load_options("w8a8", smoothing_search=True, num_samples=16, balance="modality"), calib)
    assert "smoothquant searched" in report.scheme and "modality-balanced" in report.scheme
    alphas = [s["alpha"] for s in report.smoothing.values()]
    assert len(alphas) == 2 * 2 and all(a in ALPHA_GRID for a in alphas)
    assert all(s["error"] <= s["none"] for s in report.smoothing.values())


@pytest.mark.parametrize("overrides", [{"smoothing": None}, {"activations": False, "bits": 8}])
def test_alpha_search_without_smoothing_or_activations_is_refused(overrides):
    base = {"bits": 8, "group_size": None, "activations": True, "smoothing": 0.5, "smoothing_search": True}
    with pytest.raises(ValueError, match="smoothing_search needs smoothing"):
        load_options(QuantizeOptions(**{**base, **overrides}))


def test_awq_with_smoothing_is_refused():
    with pytest.raises(ValueError, match="awq with smoothing"):
        load_options(QuantizeOptions(bits=8, group_size=None, method="awq", smoothing=0.5))
