"""Reference per-layer errors from llm-compressor on one Llama decoder layer.

What it is
    A stand-alone harness (it does not import mmpost) that runs llm-compressor's
    own modifiers on a LlamaForCausalLM built from a bundle (one decoder layer, or
    a whole LLM for end-to-end comparisons), so another
    implementation's per-layer errors can be compared with llm-compressor's on the
    same weights and the same calibration inputs.  The bundle's ``inputs_embeds``
    are the hidden states that entered the decoder layer inside a bigger model; fed
    as ``inputs_embeds`` (default position ids 0..T-1) they reproduce that layer.

How it drives llm-compressor
    Through the public entry point ``oneshot(model=..., dataset=DataLoader, recipe=
    [modifiers])``: a ready DataLoader of {"inputs_embeds", "attention_mask"} dicts
    is accepted as is (no tokenizer, no hub) and the default "independent" pipeline
    gives each modifier its own pass: the sequential pipeline (torch.fx-traced,
    layer by layer) for GPTQ, AWQ, SmoothQuant, SparseGPT and Wanda, the data-free
    one for QuantizationModifier (RTN weights, dynamic activations).  Two things
    are set up first so oneshot stays offline: the model's config is saved to a
    temporary folder that becomes its ``name_or_path`` (oneshot re-reads it), and a
    placeholder processor is passed (else oneshot tries to load one).  After
    oneshot the Linear layers keep compressed-tensors' quantized forward: weights
    are fake-quantized on the fly and, for W8A8 / FP8_DYNAMIC, input activations
    are quantized per token dynamically; the held-out evaluation runs that
    forward.  On a machine without CUDA one no-op patch is needed: AWQ pins its
    activation cache in host memory, which raises without an NVIDIA driver, so
    pinning is skipped there.

Errors
    For each Linear of layer 0 and for the layer output: sum((y_q - y_f)^2) /
    sum(y_f^2) over all held-out samples and unmasked positions, where y_f comes
    from an untouched float32 copy and y_q from the compressed model (forward hooks
    on both).  The error of a module includes what upstream modules contributed
    (o_proj's input already differs).  Calibration statistics are llm-compressor's
    own: they do not mask padded positions.

Result JSON: recipe, llmcompressor (version), errors, sparsity (fraction of zero
dequantized weights), seconds (wall time of oneshot alone), how, and extras:
activation_quant_applied ({linear: bool}) and, for 2:4 recipes, two_of_four
({linear: fraction of groups of 4 input columns with at least 2 zeros}).

Run (reference venv: ``python3 -m venv VENV && VENV/bin/pip install
llmcompressor==0.14.0.1``; no model hub is needed, set HF_HUB_OFFLINE=1)
    VENV/bin/python tools/llmc_reference.py BUNDLE.pt --out RESULT.json
    VENV/bin/python tools/llmc_reference.py --make-synthetic BUNDLE.pt --recipe gptq_w4a16
The second form writes a small synthetic bundle.  Besides RESULT.json the run
writes RESULT.weights.pt: {module name: dequantized float weight} of every
Linear and norm of every decoder layer of the bundle (the norms hold the
smoothing scales); the errors above are layer 0's.  The harness runs with
llmcompressor==0.10.0.4 (transformers 4.57) too: that version's GPTQ keeps a pruned
weight's zeros, which 0.14's no longer does, so it is the reference for SparseGPT
2:4 followed by GPTQ.
"""

import argparse
import copy
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

RECIPES = [
    "gptq_w4a16",
    "awq_w4a16",
    "w8a8_smoothquant",
    "w8a8_smoothquant_rtn",
    "fp8_dynamic",
    "sparsegpt_2of4",
    "wanda_2of4",
    "sparsegpt_unstructured",
    "sparsegpt_2of4_w4a16",
]
LINEARS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
NORMS = ["input_layernorm", "post_attention_layernorm"]
PREFIX = "model.layers.0."


def make_synthetic_bundle(
    path, recipe, seed=0, hidden=256, inter=512, heads=4, kv_heads=2, vocab=64, n_calib=8, n_held=4, seq=64
):
    """Write a small random bundle: hidden states ~N(0, 1) with 4 outlier channels of
    10x magnitude (so smoothing matters); the last held-out sample has 8 padded
    positions (attention_mask 0) to exercise masking."""
    from transformers import LlamaConfig, LlamaForCausalLM

    g = torch.Generator().manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        num_hidden_layers=1,
        max_position_embeddings=4 * seq,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():  # non-trivial norm weights, like a trained model
        for norm in (model.model.layers[0].input_layernorm, model.model.layers[0].post_attention_layernorm):
            norm.weight.copy_(1 + 0.2 * torch.randn(hidden, generator=g))
    outliers = torch.randperm(hidden, generator=g)[:4]

    def sample(pad=0):
        x = torch.randn(1, seq, hidden, generator=g)
        x[..., outliers] *= 10.0
        mask = torch.ones(1, seq, dtype=torch.long)
        if pad:
            mask[:, seq - pad :] = 0
        return {"inputs_embeds": x, "attention_mask": mask}

    torch.save(
        {
            "config": cfg.to_dict(),
            "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
            "calib": [sample() for _ in range(n_calib)],
            "held_out": [sample(8 if i == n_held - 1 else 0) for i in range(n_held)],
            "recipe": recipe,
            "options": {"group_size": 128, "smoothing_strength": 0.5, "dampening": 0.01, "sparsity": 0.5},
        },
        path,
    )


def build_recipe(name, opts):
    """llm-compressor modifiers for a recipe name, and a short description."""
    from compressed_tensors.quantization import preset_name_to_scheme
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    try:
        from llmcompressor.modifiers.transform import SmoothQuantModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier
    except ImportError:  # llm-compressor <= 0.10 kept them at the top level of modifiers
        from llmcompressor.modifiers.awq import AWQModifier
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    gs = int(opts.get("group_size", 128))
    damp = float(opts.get("dampening", 0.01))
    alpha = float(opts.get("smoothing_strength", 0.5))
    ign = ["lm_head"]

    def w4(preset="W4A16"):  # preset scheme with the requested group size
        scheme = preset_name_to_scheme(preset, ["Linear"])
        scheme.weights.group_size = gs
        return {"group_0": scheme}

    def gptq_w4():
        return GPTQModifier(config_groups=w4(), ignore=ign, dampening_frac=damp)

    w4_txt = f"int4 symmetric group {gs}"
    if name == "gptq_w4a16":
        return [gptq_w4()], (f"GPTQModifier W4A16 ({w4_txt}, dampening_frac={damp}, actorder=static, the default)")
    if name == "awq_w4a16":
        return (
            [AWQModifier(), QuantizationModifier(config_groups=w4(), ignore=ign)],
            "AWQModifier (default Llama mappings; v_proj->o_proj is skipped by llm-compressor "
            "when kv heads != heads; duo_scaling=True, n_grid=20) + QuantizationModifier "
            f"W4A16 ({w4_txt}; AWQ does not require asymmetric, its examples use W4A16_ASYM)",
        )
    if name in ("w8a8_smoothquant", "w8a8_smoothquant_rtn"):
        sq = SmoothQuantModifier(smoothing_strength=alpha)  # default Llama mappings
        if name == "w8a8_smoothquant":
            quant, q = GPTQModifier(scheme="W8A8", ignore=ign, dampening_frac=damp), "GPTQModifier"
        else:
            quant, q = QuantizationModifier(scheme="W8A8", ignore=ign), "QuantizationModifier"
        return [sq, quant], (
            f"SmoothQuantModifier(smoothing_strength={alpha}, default mappings "
            f"input_layernorm->qkv, post_attention_layernorm->gate/up) + {q} W8A8 "
            "(int8 sym per-channel weights, int8 sym per-token dynamic "
            "activations)"
        )
    if name == "fp8_dynamic":
        return (
            [QuantizationModifier(scheme="FP8_DYNAMIC", ignore=ign)],
            "QuantizationModifier FP8_DYNAMIC (fp8 e4m3 per-channel weights, per-token dynamic fp8 activations)",
        )
    if name in ("sparsegpt_2of4", "sparsegpt_2of4_w4a16"):
        sp = SparseGPTModifier(sparsity=0.5, mask_structure="2:4", ignore=ign, dampening_frac=damp)
        if name == "sparsegpt_2of4":
            return [sp], (f"SparseGPTModifier(sparsity=0.5, mask_structure='2:4', dampening_frac={damp})")
        return [sp, gptq_w4()], (
            f"SparseGPTModifier 2:4 then GPTQModifier W4A16 ({w4_txt}, "
            f"dampening_frac={damp}); llm-compressor 0.14's GPTQ does not "
            "keep the 2:4 mask (see two_of_four)"
        )
    if name == "wanda_2of4":
        return (
            [WandaPruningModifier(sparsity=0.5, mask_structure="2:4", ignore=ign)],
            "WandaPruningModifier(sparsity=0.5, mask_structure='2:4')",
        )
    if name == "sparsegpt_unstructured":
        s = float(opts.get("sparsity", 0.5))
        return (
            [SparseGPTModifier(sparsity=s, mask_structure="0:0", ignore=ign, dampening_frac=damp)],
            f"SparseGPTModifier(sparsity={s}, mask_structure='0:0', dampening_frac={damp})",
        )
    raise SystemExit(f"unknown recipe {name!r}; choose from {RECIPES}")


def dequantized_weight(module):
    """The weight the quantized forward multiplies by (fake-quantized if quantized)."""
    from compressed_tensors.quantization import forward_quantize

    scheme = getattr(module, "quantization_scheme", None)
    w = module.weight.data
    if scheme is not None and scheme.weights is not None:
        w = forward_quantize(module, w, "weight", scheme.weights)
    return w.detach().float().cpu().clone()


@torch.no_grad()
def held_out_errors(float_model, quant_model, samples):
    """Relative output errors over unmasked held-out positions; also, per Linear,
    whether the compressed forward differs from x @ dequantized(W).T (i.e. whether
    it quantizes its input activations)."""
    names = [PREFIX + n for n in LINEARS] + ["layer"]
    num, den = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    outs_f, outs_q, act_check = {}, {}, {}

    def hook(store, name):
        def fn(module, args, out):
            store[name] = (out[0] if isinstance(out, tuple) else out).float()
            if store is outs_q and name != "layer" and name not in act_check:
                x = args[0].float()
                plain = torch.nn.functional.linear(x, dequantized_weight(module), module.bias)
                gap = (plain - store[name]).abs().max()
                act_check[name] = bool(gap > 1e-5 * (plain.abs().max() + 1e-12))

        return fn

    handles = []
    for model, store in ((float_model, outs_f), (quant_model, outs_q)):
        for n in names:
            mod = model.get_submodule(PREFIX.rstrip(".") if n == "layer" else n)
            handles.append(mod.register_forward_hook(hook(store, n)))
    for s in samples:
        mask = s["attention_mask"].bool()
        kw = {"inputs_embeds": s["inputs_embeds"].float(), "attention_mask": s["attention_mask"], "use_cache": False}
        float_model(**kw)
        quant_model(**kw)
        for n in names:
            yf, yq = outs_f[n][mask], outs_q[n][mask]
            num[n] += float(((yq - yf) ** 2).sum())
            den[n] += float((yf**2).sum())
    for h in handles:
        h.remove()
    return {n: num[n] / max(den[n], 1e-30) for n in names}, act_check


class _NoProcessor:
    """Stands in for a tokenizer: the DataLoader already holds model inputs."""


def run(bundle_path, out_path):
    import llmcompressor
    from llmcompressor import oneshot
    from torch.utils.data import DataLoader
    from transformers import LlamaConfig, LlamaForCausalLM

    bundle = torch.load(bundle_path, map_location="cpu", weights_only=False)
    recipe, opts = bundle["recipe"], dict(bundle.get("options") or {})
    cfg = dict(bundle["config"])
    for k in ("_name_or_path", "name_or_path", "dtype", "torch_dtype", "quantization_config"):
        cfg.pop(k, None)
    config = LlamaConfig(**cfg)
    config._attn_implementation = "eager"  # what llm-compressor calibrates with
    model = LlamaForCausalLM(config).float().eval()
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in bundle["state_dict"].items()}, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # absent when tied
    assert not missing and not unexpected, f"state dict mismatch: {missing} {unexpected}"
    float_model = copy.deepcopy(model).eval()

    calib = [
        {"inputs_embeds": s["inputs_embeds"].float(), "attention_mask": s["attention_mask"]} for s in bundle["calib"]
    ]
    loader = DataLoader(calib, batch_size=None, shuffle=False)  # items are already batches
    modifiers, how = build_recipe(recipe, opts)
    if not torch.cuda.is_available():
        # llm-compressor 0.14's AWQ pins its activation cache (a host->GPU transfer
        # speed-up), which raises without an NVIDIA driver; pinning changes no value.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *a, **k: None

    if tuple(int(p) for p in llmcompressor.__version__.split(".")[:2]) <= (0, 10):
        # llm-compressor <= 0.10 tokenizes any dataset it is given; hand it the ready DataLoader instead
        sys.modules["llmcompressor.entrypoints.oneshot"].get_calibration_dataloader = lambda *a, **k: loader

    with tempfile.TemporaryDirectory() as cfg_dir:
        model.config.save_pretrained(cfg_dir)
        model.config._name_or_path = cfg_dir
        t0 = time.time()
        model = oneshot(
            model=model,
            dataset=loader,
            recipe=modifiers,
            processor=_NoProcessor(),
            num_calibration_samples=len(calib),
            shuffle_calibration_samples=False,
        )
        seconds = time.time() - t0
    model.eval()

    errors, act_check = held_out_errors(float_model, model, bundle["held_out"])
    weights, sparsity = {}, {}
    for layer in range(config.num_hidden_layers):
        for n in LINEARS:
            name = f"model.layers.{layer}.{n}"
            weights[name] = dequantized_weight(model.get_submodule(name))
            if layer == 0:
                sparsity[name] = float((weights[name] == 0).float().mean())
        for norm in NORMS:  # AWQ and SmoothQuant divide the norms' weights by their scales
            name = f"model.layers.{layer}.{norm}"
            weights[name] = model.get_submodule(name).weight.detach().float().cpu().clone()
    result = {
        "recipe": recipe,
        "llmcompressor": llmcompressor.__version__,
        "errors": errors,
        "sparsity": sparsity,
        "seconds": seconds,
        "how": how,
        "activation_quant_applied": act_check,
    }
    if "2of4" in recipe:  # fraction of groups of 4 (along inputs) with >= 2 zeros
        result["two_of_four"] = {
            n: float(((weights[n].reshape(-1, 4) == 0).sum(1) >= 2).float().mean()) for n in sparsity
        }
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2)
    torch.save(weights, os.path.splitext(out_path)[0] + ".weights.pt")
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--out", help="result JSON path")
    ap.add_argument("--make-synthetic", action="store_true", help="write a synthetic bundle")
    ap.add_argument("--recipe", default="gptq_w4a16", choices=RECIPES)
    a = ap.parse_args(argv)
    if a.make_synthetic:
        make_synthetic_bundle(a.bundle, a.recipe)
        return
    if not a.out:
        ap.error("--out is required")
    res = run(a.bundle, a.out)
    print(json.dumps({k: res[k] for k in ("recipe", "errors", "seconds")}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
