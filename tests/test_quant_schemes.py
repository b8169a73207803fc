"""AWQ, W8A8 with SmoothQuant, FP8, FP8 KV cache and 2:4 / unstructured pruning, calibrated through the whole LMM:
each export reloads in transformers computing what mmpost computes, and each method does what it claims on the
layers it changes."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText

import mmpost
from mmpost.export import export, read_report
from mmpost.model.build import load_lmm
from mmpost.model.quantized import WeightScheme
from mmpost.quant import QuantizeOptions, load_options, quantize
from mmpost.quant.smooth import apply_scales, mappings
from tests.test_quant import calib_source, spread


def llava(llm_dir, clip_dir) -> mmpost.LMM:
    return spread(
        mmpost.LMM(
            llm=str(llm_dir),
            encoders={"image": mmpost.encoder("hf_vision", path=str(clip_dir))},
            connectors={"image": mmpost.connector("mlp")},
        )
    )


SCHEMES = {
    # preset, checkpoint format, weight type / bits, activations quantized
    "w4a16-awq": ("pack-quantized", ("int", 4), False),
    "w8a8": ("int-quantized", ("int", 8), True),
    "fp8": ("float-quantized", ("float", 8), True),
    "fp8-kv": ("float-quantized", ("float", 8), True),
    "sparse24": ("dense", None, False),
    "sparse24-w4a16": ("pack-quantized", ("int", 4), False),
}


@pytest.mark.parametrize("preset", list(SCHEMES))
def test_every_scheme_exports_and_transformers_reloads_the_same_model(
    preset, llm_dir, clip_dir, synth_dir, calib, tmp_path
):
    model = llava(llm_dir, clip_dir)
    options = load_options(preset, group_size=32, num_samples=16)
    out = export(model, tmp_path / "hf", fmt="hf", quantize=options, calib=calib_source(synth_dir))
    report = read_report(out)
    # the export check: transformers' reload gives mmpost's logits and greedy tokens
    assert report["reload"]["greedy_agreement"] == "4/4"
    assert report["reload"]["max_abs_logit_diff"] < 1e-4
    fmt, weights, activations = SCHEMES[preset]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == fmt
    if weights:
        group = config["config_groups"]["group_0"]
        assert (group["weights"]["type"], group["weights"]["num_bits"]) == weights
        assert (group["input_activations"] is not None) == activations
    if "sparse24" in preset:
        assert config["sparsity_config"]["sparsity_structure"] == "2:4"
        assert config["sparsity_config"]["global_sparsity"] == pytest.approx(0.5, abs=0.01)
    if preset == "sparse24":  # stored dense, zeros included
        hf = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
        w = hf.model.language_model.layers[1].mlp.down_proj.weight
        assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all()  # two of every four are zero
    if preset == "fp8-kv":
        assert config["kv_cache_scheme"]["type"] == "float" and config["kv_cache_scheme"]["num_bits"] == 8
        index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        assert "model.language_model.layers.0.self_attn.k_scale" in index
    # mmpost's own format keeps the scheme too, and reloads to the same logits
    model.save(tmp_path / "mm")
    again = load_lmm(tmp_path / "mm").eval()
    assert again.quantization.describe() == model.quantization.describe().replace(model.quantization.method, "loaded")
    probe = next(iter(_probe_batches(model)))
    with torch.no_grad():
        assert torch.equal(model(*probe).logits, again(*probe).logits)


def _probe_batches(model):
    from mmpost.export.check import probes

    return [p.args() for p in probes(model, 1)]


def test_w8a8_quantizes_each_layers_inputs_per_token(llm_dir, clip_dir, calib):
    """What q_proj computes with: its input, each token scaled by its own max |x| / 127.5 and rounded to int8."""
    model = llava(llm_dir, clip_dir)
    quantize(model, load_options("w8a8-rtn", num_samples=16), calib)
    attn = model.base_llm.model.layers[0].self_attn
    seen = {}
    norm = model.base_llm.model.layers[0].input_layernorm.register_forward_hook(
        lambda m, a, out: seen.__setitem__("raw", out.detach())
    )
    q_in = attn.q_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("used", a[0].detach()))
    probe = _probe_batches(model)[0]
    with torch.no_grad():
        with_acts = model(*probe).logits
        norm.remove(), q_in.remove()
        model.quantization.runtime.remove()  # the same weights, float activations
        weights_only = model(*probe).logits
    raw = seen["raw"]
    scale = raw.abs().amax(dim=-1, keepdim=True) / 127.5
    expected = (raw / scale).round().clamp(-128, 127) * scale
    assert torch.allclose(seen["used"], expected, atol=1e-6)
    assert not torch.equal(seen["used"], raw) and not torch.equal(with_acts, weights_only)


def test_smoothing_leaves_the_float_model_unchanged(make_model, calib):
    model = spread(make_model("mlp"))
    layer = model.base_llm.model.layers[0]
    from mmpost.model.quantized import selected_linears

    linears = selected_linears(model.base_llm, ["lm_head"])
    pairs = mappings(layer, "model.layers.0", linears)
    # q/k/v from the input norm, gate/up from the MLP's norm, down from up; v -> o is skipped (GQA: 2 kv heads)
    assert [p.names for p in pairs] == [
        ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"],
        ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"],
        ["model.layers.0.mlp.down_proj"],
    ]
    probe = _probe_batches(model)[0]
    with torch.no_grad():
        before = model(*probe).logits
        for pair in pairs:
            apply_scales(pair, torch.rand(pair.balance[0].in_features) + 0.5)
        after = model(*probe).logits
    assert torch.allclose(before, after, atol=1e-4)


def test_awq_and_smoothquant_lower_the_error_of_round_to_nearest(make_model, calib):
    """On each smoothed group, AWQ's chosen scales give its parent a lower output error than round-to-nearest's."""
    awq_model = spread(make_model("mlp"))
    report = quantize(awq_model, QuantizeOptions(bits=4, group_size=32, method="awq", num_samples=16), calib)
    assert len(report.smoothing) == 2 * 3
    assert all(s["error"] <= s["rtn"] for s in report.smoothing.values())
    assert sum(s["error"] for s in report.smoothing.values()) < 0.95 * sum(s["rtn"] for s in report.smoothing.values())
    summary = report.summary()  # the summary carries the gain: the rounding alone, of scaled weights, cannot show it
    ratios = [s["error"] / s["rtn"] for s in report.smoothing.values()]
    assert summary["awq_error_vs_rtn"] == pytest.approx(sum(ratios) / len(ratios)) and summary["awq_error_vs_rtn"] < 1


@pytest.mark.parametrize("preset", ["w4a16-awq", "w8a8"])
def test_every_layers_scales_are_searched_on_the_float_models_inputs(make_model, calib, monkeypatch, preset):
    """As AWQ's paper and llm-compressor do: a later layer's scales do not depend on how the earlier ones were
    rounded, so a pass that rounds nothing smooths every layer alike (the norms hold the scales)."""
    import mmpost.quant.apply as apply

    def norms(model):
        return {n: p.detach().clone() for n, p in model.base_llm.named_parameters() if "layernorm" in n}

    options = load_options(preset, group_size=32 if "awq" in preset else None, num_samples=16)
    rounded = spread(make_model("mlp"))
    quantize(rounded, options, calib)
    monkeypatch.setattr(apply, "compress_one", lambda *args, **kwargs: None)
    unrounded = spread(make_model("mlp"))
    quantize(unrounded, options, calib)
    got, want, untouched = norms(rounded), norms(unrounded), norms(spread(make_model("mlp")))
    assert len(want) == 2 * len(rounded.base_llm.model.layers)
    assert any(not torch.equal(want[name], untouched[name]) for name in want)  # the smoothing changed the norms
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("pruning", ["sparsegpt", "wanda"])
@pytest.mark.parametrize("structure, sparsity", [("2:4", 0.5), ("unstructured", 0.4)])
def test_pruning_reaches_its_pattern_and_sparsegpt_compensates(make_model, calib, pruning, structure, sparsity):
    model = spread(make_model("mlp"))
    options = QuantizeOptions(
        bits=None, sparsity=sparsity, sparsity_structure=structure, pruning=pruning, num_samples=16
    )
    report = quantize(model, options, calib)
    assert report.sparsity == pytest.approx(sparsity, abs=0.01)
    for name in model.quantization.sparse_layers:
        w = model.base_llm.get_submodule(name).weight
        if structure == "2:4":
            assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) == 2).all()
    if pruning == "sparsegpt":  # the kept weights moved: errors below what removing the same weights alone gives
        wanda_model = spread(make_model("mlp"))
        wanda_report = quantize(wanda_model, QuantizeOptions(**{**options.__dict__, "pruning": "wanda"}), calib)
        mean = sum(e["final"] for e in report.errors.values()) / len(report.errors)
        wanda_mean = sum(e["final"] for e in wanda_report.errors.values()) / len(wanda_report.errors)
        assert mean < wanda_mean


def test_pruned_and_quantized_weights_keep_the_pattern(make_model, calib):
    model = spread(make_model("mlp"))
    quantize(model, load_options("sparse24-w4a16", group_size=32, num_samples=16), calib)
    for name in model.quantization.layers:
        w = model.base_llm.get_submodule(name).weight
        assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all()
    assert model.quantization.describe().startswith("int4 sym g32, 2:4 sparse")


def test_kv_cache_scales_come_from_keys_after_rotary_embedding(make_model, calib):
    model = spread(make_model("mlp"))
    quantize(
        model, QuantizeOptions(bits=8, type="float", group_size=None, method="rtn", kv_cache=True, num_samples=8), calib
    )
    scales = model.quantization.kv_scales
    assert sorted(scales) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert all(k.item() > 0 and v.item() > 0 for k, v in scales.values())
    probe = _probe_batches(model)[0]
    with torch.no_grad():
        quantized_kv = model(*probe).logits
        generated = model.generate(*probe, 4)  # through a real cache too
        model.quantization.runtime.remove()
        plain = model(*probe).logits
    assert not torch.equal(quantized_kv, plain) and generated.shape[1] == 4


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"bits": 4, "activations": True}, "needs bits 8"),
        ({"type": "float", "bits": 4}, "FP8"),
        ({"sparsity": 0.3, "sparsity_structure": "2:4"}, "exactly half"),
        ({"bits": None}, "nothing to do"),
        ({"smoothing": 1.5}, "in \\(0, 1\\)"),
    ],
)
def test_bad_combinations_are_refused_naming_the_keys(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_options(QuantizeOptions(**overrides))


def test_two_four_on_a_width_not_divisible_by_four_is_refused_naming_the_layer(make_model, calib):
    model = make_model("mlp")
    layer = model.base_llm.model.layers[0].mlp.down_proj
    model.base_llm.model.layers[0].mlp.down_proj = torch.nn.Linear(layer.in_features - 2, layer.out_features)
    before = model.base_llm.model.layers[1].mlp.down_proj.weight.clone()
    with pytest.raises(
        ValueError, match="model.layers.0.mlp.down_proj: 2:4 sparsity needs an input width divisible by 4"
    ):
        quantize(model, load_options("sparse24"), calib)
    assert torch.equal(before, model.base_llm.model.layers[1].mlp.down_proj.weight)  # before any work


def test_weight_scheme_labels():
    assert WeightScheme(bits=8, group_size=None, type="float").describe() == "fp8 per-channel"
    with pytest.raises(ValueError, match="FP8"):
        WeightScheme(bits=4, type="float")


@pytest.mark.parametrize(
    "connector, kwargs, preset",
    [("qformer", {"num_queries": 4}, "w4a16-awq"), ("xattn", {"every": 1}, "w8a8"), ("xattn", {"every": 1}, "fp8-kv")],
)
def test_other_connectors_calibrate_and_export_every_kind_of_scheme(
    connector, kwargs, preset, make_model, synth_dir, tmp_path
):
    """Q-Former tokens and fusion cross-attention (which runs inside the decoder layers being calibrated)."""
    model = spread(make_model(connector, **kwargs))
    options = load_options(preset, group_size=32, num_samples=16)
    out = export(model, tmp_path / "q", fmt="mmpost", quantize=options, calib=calib_source(synth_dir))
    report = read_report(out)
    assert report["reload"]["greedy_agreement"] == "4/4" and report["reload"]["max_abs_logit_diff"] == 0.0
    assert report["quantization"]["media_rows"] > 0 or connector == "xattn"  # fusion adds no media tokens
    assert mmpost.load(out).quantization.describe().split(" (")[0] == model.quantization.describe().split(" (")[0]
