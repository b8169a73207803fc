"""The harness that compares mmpost's compression with llm-compressor's: its one-layer model fed the captured
hidden states computes exactly the decoder layer of the multimodal model, so both libraries work on that
layer's real inputs. The comparison itself needs llm-compressor's own environment (opt-in, ``MMPOST_LLMC_PYTHON``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_quant import spread

TOOLS = Path(__file__).parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
import quant_reference  # noqa: E402


def test_the_one_layer_model_computes_the_multimodal_models_layer(make_model, calib):
    model = spread(make_model("mlp"))
    states = quant_reference.layer_states(model, calib[:3], 1)
    assert states[0]["inputs_embeds"].shape[1] > model.media_tokens("image", (3, 32, 32))  # media tokens included
    bundle = quant_reference.make_bundle(model, 1, states, states)
    one = quant_reference.bundle_model(bundle)
    seen = {}
    model.base_llm.model.layers[1].register_forward_hook(lambda m, a, out: seen.__setitem__("full", out))
    one.model.layers[0].register_forward_hook(lambda m, a, out: seen.__setitem__("one", out))
    from mmpost.data.pipeline import ConversationPipeline

    pipeline = ConversationPipeline.for_model(model, 4096)
    with torch.no_grad():
        batch = pipeline.collate([pipeline.process(calib[0])])
        model.hidden_states(batch.input_ids, batch.attention_mask, batch.media)
        one(inputs_embeds=states[0]["inputs_embeds"], attention_mask=states[0]["attention_mask"], use_cache=False)
    full = seen["full"][0] if isinstance(seen["full"], tuple) else seen["full"]
    got = seen["one"][0] if isinstance(seen["one"], tuple) else seen["one"]
    assert torch.allclose(full, got, atol=1e-5)


def test_mmpost_side_measures_each_method_on_the_layer(make_model, calib):
    from mmpost.quant import load_options

    model = spread(make_model("mlp"))
    states = quant_reference.layer_states(model, calib[:8], 1)
    bundle = quant_reference.make_bundle(model, 1, states[:6], states[6:])
    errors = {p: quant_reference.mmpost_errors(bundle, load_options(p, group_size=32)) for p in ("w4a16", "w4a16-gptq")}
    assert all(0 < e < 1 for e in errors["w4a16-gptq"].values())
    q_proj = "model.layers.0.self_attn.q_proj"
    assert errors["w4a16-gptq"][q_proj] < errors["w4a16"][q_proj]  # GPTQ beats rounding on held-out states too


@pytest.mark.parametrize("preset", ["w4a16", "w8a8-rtn"])
def test_the_whole_llm_bundle_reproduces_the_models_answers_and_measures_their_drift(make_model, calib, preset):
    from mmpost.quant import load_options

    model = spread(make_model("mlp"))
    states = quant_reference.layer_states(model, calib[:8], 0)
    bundle = quant_reference.make_bundle(model, None, states[:6], states[6:])
    llm = quant_reference.bundle_model(bundle)
    assert len(llm.model.layers) == len(model.base_llm.model.layers)
    from mmpost.data.pipeline import ConversationPipeline

    pipeline = ConversationPipeline.for_model(model, 4096)
    with torch.no_grad():
        batch = pipeline.collate([pipeline.process(calib[6])])
        answers = model(batch.input_ids, batch.attention_mask, batch.media, batch.labels).logits  # [answer tokens, V]
        keep = states[6]["labels"][:, 1:] != -100
        got = llm(inputs_embeds=states[6]["inputs_embeds"], attention_mask=states[6]["attention_mask"]).logits
    assert torch.allclose(got[:, :-1][keep], answers, atol=1e-4)  # the same answer logits as the multimodal model
    float_answers = quant_reference.answer_log_probs(llm, bundle["held_out"])
    assert quant_reference.answer_drift(float_answers, llm, bundle["held_out"]) == {
        "kl_to_float": 0.0,
        "greedy_agreement": 1.0,
    }
    options = load_options(preset, group_size=load_options(preset).group_size and 32)
    rounded, state = quant_reference.mmpost_compress(bundle, options)
    drift = quant_reference.answer_drift(float_answers, rounded, bundle["held_out"])
    assert drift["kl_to_float"] > 0
    weights = {
        n: m.weight.detach().clone()
        for n, m in rounded.named_modules()
        if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)
    }
    # dequantized weights carry it all, with the inputs quantized per token where the scheme does so
    again = quant_reference.with_weights(bundle, weights, state)
    assert quant_reference.answer_drift(float_answers, again, bundle["held_out"])["kl_to_float"] == pytest.approx(
        drift["kl_to_float"], rel=1e-4
    )
    if state.activations is not None:  # without the inputs' quantization the same weights drift less
        weights_only = quant_reference.with_weights(bundle, weights)
        plain = quant_reference.answer_drift(float_answers, weights_only, bundle["held_out"])
        assert plain["kl_to_float"] < 0.9 * drift["kl_to_float"]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MMPOST_LLMC_PYTHON"), reason="needs MMPOST_LLMC_PYTHON: llm-compressor's env")
def test_every_method_is_within_ten_percent_of_llm_compressor(demo_sft, tmp_path):
    out = tmp_path / "reference.json"
    subprocess.run(
        [
            sys.executable,
            str(TOOLS / "quant_reference.py"),
            str(demo_sft / "runs" / "sft"),
            "--reference-python",
            os.environ["MMPOST_LLMC_PYTHON"],
            "--json",
            str(out),
        ],
        check=True,
    )
    rows = json.loads(out.read_text())
    # llm-compressor 0.14's GPTQ does not keep a pruned weight's zeros, so its 2:4 + int4 weights are no longer 2:4:
    # a less constrained weight, whose error the bar cannot compare with (mmpost's stay 2:4: test_quant_schemes.py)
    unconstrained = {name for name, row in rows.items() if row.get("llmcompressor_two_of_four", 1.0) < 1.0}
    assert unconstrained <= {"sparsegpt_2of4_w4a16"}
    over = {name: round(row["worst_ratio"], 3) for name, row in rows.items() if row["worst_ratio"] > 1.10}
    assert {name: ratio for name, ratio in over.items() if name not in unconstrained} == {}
