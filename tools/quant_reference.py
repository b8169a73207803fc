"""mmpost's compression methods against llm-compressor's on the same decoder layer and the same inputs.

    python tools/quant_reference.py RUN --reference-python VENV/bin/python [--layer 1 | --whole] [--recipes a,b]
                                    [--calib-samples 32] [--held-out 16] [--group-size 64] [--json out.json]
    python tools/quant_reference.py MODEL_DIR --calib DATA --held-out-data DATA [--image-root DIR] ...

The hidden states that enter decoder layer ``--layer`` of a finished run's model (``RUN/final``) are gathered
on multimodal samples (the run's training data for calibration, its held-out data for measuring), run through
the encoder and connector as in serving. That layer becomes a one-layer Llama fed those states as
``inputs_embeds`` (a "bundle"); llm-compressor (``tools/llmc_reference.py``, run by ``--reference-python``, a
separate environment since llm-compressor pins other versions of torch, transformers and compressed-tensors)
and mmpost (``mmpost.quant``'s own layer-by-layer code, unchanged) compress it on the calibration states, and both
are measured with the same code on the held-out states: per linear layer, ``sum((y_q - y_f)^2) / sum(y_f^2)``.
``ratio`` is mmpost's error over llm-compressor's; the acceptance bar is ratio <= 1.10 on every layer.

With ``--whole`` the bundle is the whole LLM fed the states entering its first decoder layer (text embeddings with
the connected media in place), each library compresses all of it, and the comparison is end to end on the held-out
answer tokens: KL(float || compressed) of the next-token distributions and greedy agreement with the float model,
with mmpost's round to nearest as the baseline the calibrated methods should beat. llm-compressor's side is its
dequantized weights in a plain model, which is its compressed forward for weight-only recipes; for W8A8 and FP8 the
quantized layers' inputs are then quantized per token with the same compressed-tensors code on both sides.
``--text-calib`` calibrates both on the same samples without their media (the held-out states keep theirs).

mmpost runs GPTQ with ``act_order`` on, as llm-compressor's GPTQ does by default (static groups). Under AWQ a
linear layer that feeds another (``up_proj`` into ``down_proj``; ``v_proj`` into ``o_proj`` without grouped-query
attention) has its output rows divided by the scales on purpose, so its own "error" measures that rescaling (both
libraries rescale the same way); the layers it feeds, and the decoder layer's output, carry the comparison there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import llmc_reference  # noqa: E402  (the measuring code, shared with the reference side)

RECIPES = {
    "gptq_w4a16": ("w4a16-gptq", {"act_order": True}),
    "awq_w4a16": ("w4a16-awq", {}),
    "w8a8_smoothquant": ("w8a8", {"act_order": True}),
    "w8a8_smoothquant_rtn": ("w8a8-rtn", {"smoothing": 0.5}),
    "fp8_dynamic": ("fp8", {}),
    "sparsegpt_2of4": ("sparse24", {}),
    "wanda_2of4": ("sparse24-wanda", {}),
    "sparsegpt_unstructured": ("sparse24", {"sparsity": 0.5, "sparsity_structure": "unstructured"}),
    "sparsegpt_2of4_w4a16": ("sparse24-w4a16", {"act_order": True}),
}


def layer_states(model, samples, layer_index: int) -> list[dict]:
    """The hidden states entering decoder layer ``layer_index``, one sample at a time (no padding), with the
    sample's labels (answer tokens, ``-100`` elsewhere)."""
    from mmpost.data.pipeline import ConversationPipeline

    layer = model.base_llm.get_decoder().layers[layer_index]
    pipeline = ConversationPipeline.for_model(model, 4096)
    seen = {}

    def grab(module, args, kwargs):
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach().float().clone()
        raise StopIteration

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    out = []
    try:
        with torch.no_grad():
            for sample in samples:
                batch = pipeline.collate([pipeline.process(sample)])
                try:
                    model.hidden_states(batch.input_ids, batch.attention_mask, batch.media)
                except StopIteration:
                    pass
                out.append(
                    {"inputs_embeds": seen["x"], "attention_mask": batch.attention_mask.long(), "labels": batch.labels}
                )
    finally:
        handle.remove()
    return out


def make_bundle(model, layer_index: int | None, calib: list, held_out: list) -> dict:
    """The one-layer Llama holding decoder layer ``layer_index`` of ``model``'s LLM, or the whole LLM when
    ``layer_index`` is None, and its inputs."""
    base = model.base_llm
    config = base.config.to_dict() | {"tie_word_embeddings": False}
    config.pop("quantization_config", None)
    state = {key: value.float() for key, value in base.state_dict().items()}
    if layer_index is not None:
        config["num_hidden_layers"] = 1
        prefix = f"model.layers.{layer_index}."
        state = {
            "model.layers.0." + key[len(prefix) :] if key.startswith(prefix) else key: value
            for key, value in state.items()
            if key.startswith(prefix) or not key.startswith("model.layers.")
        }
    state.setdefault("lm_head.weight", base.get_output_embeddings().weight.float())
    return {"config": config, "state_dict": state, "calib": calib, "held_out": held_out}


@dataclass
class _Batch:
    """A calibration batch of hidden states, shaped as mmpost's calibration code reads a batch."""

    ids: list
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    media: dict

    def to(self, device):
        return self


class _OneLayer:
    """The parts of an LMM that mmpost's calibration touches, over a one-layer LLM fed hidden states."""

    def __init__(self, llm):
        self.base_llm, self.placeholder_ids, self.modalities = llm, {}, []

    def parameters(self):
        return self.base_llm.parameters()

    def hidden_states(self, input_ids, attention_mask, media):
        return self.base_llm.model(inputs_embeds=media["embeds"], attention_mask=attention_mask, use_cache=False)


def bundle_model(bundle: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in bundle["config"].items() if k not in ("architectures", "model_type")})
    config._attn_implementation = "eager"
    llm = LlamaForCausalLM(config).float().eval()
    llm.load_state_dict(bundle["state_dict"], strict=False)
    return llm


def mmpost_compress(bundle: dict, options):
    """The bundle's model compressed by mmpost on the bundle's calibration states, and mmpost's record of that
    compression (its ``QuantState``)."""
    from mmpost.model.quantized import install_runtime, selected_linears
    from mmpost.quant.apply import QuantReport, compress_layers

    # the bundle holds hidden states with no answer to differentiate and no modality per token, as llm-compressor's
    # side gets them: the searches count every token alike (AWQ's own measure) on both sides
    options = replace(options, balance="none")
    llm = bundle_model(bundle)
    batches = [
        _Batch(
            [0],
            torch.zeros(s["attention_mask"].shape, dtype=torch.long),
            s["attention_mask"],
            {"embeds": s["inputs_embeds"]},
        )
        for s in bundle["calib"]
    ]
    linears = selected_linears(llm, options.ignore)
    state = options.new_state()
    with torch.no_grad():
        compress_layers(_OneLayer(llm), options, batches, linears, state, QuantReport("", len(linears)), False)
    state.runtime = install_runtime(llm, state)
    return llm, state


def mmpost_errors(bundle: dict, options) -> dict:
    llm, _ = mmpost_compress(bundle, options)
    errors, _ = llmc_reference.held_out_errors(bundle_model(bundle), llm, bundle["held_out"])
    return errors


@torch.no_grad()
def answer_log_probs(llm, held_out: list) -> list[torch.Tensor]:
    """Per held-out sample, ``llm``'s next-token log-probabilities at the positions that predict its answer."""
    out = []
    for s in held_out:
        keep = s["labels"][:, 1:] != -100  # position t predicts token t + 1
        logits = llm(inputs_embeds=s["inputs_embeds"], attention_mask=s["attention_mask"], use_cache=False).logits
        out.append(logits[:, :-1][keep].float().log_softmax(-1))
    return out


def answer_drift(float_answers: list[torch.Tensor], llm, held_out: list) -> dict:
    """KL(float || compressed) of the next-token distributions over the held-out answer tokens, and how often
    the compressed model's greedy token is the float model's there; ``float_answers``: the float model's
    ``answer_log_probs``, computed once for every compressed model."""
    from mmpost.losses.distill import token_kl

    kl, same, tokens = 0.0, 0, 0
    for p, q in zip(float_answers, answer_log_probs(llm, held_out), strict=True):
        kl += float(token_kl(p, q).sum())
        same += int((p.argmax(-1) == q.argmax(-1)).sum())
        tokens += p.shape[0]
    return {"kl_to_float": kl / max(tokens, 1), "greedy_agreement": same / max(tokens, 1)}


def with_weights(bundle: dict, weights: dict, state=None):
    """The bundle's model with the weights llm-compressor produced, its linear layers' dequantized and its norms'
    smoothed. For weight-only schemes its forward is then exactly the compressed one; for schemes that quantize
    activations, ``state`` (mmpost's record of the same scheme) adds the per-token quantization of the quantized
    layers' inputs, with compressed-tensors' arithmetic as llm-compressor's quantized forward does."""
    from mmpost.model.quantized import install_runtime

    llm = bundle_model(bundle)
    with torch.no_grad():
        for name, weight in weights.items():
            llm.get_submodule(name).weight.copy_(weight)
    if state is not None and state.activations is not None:
        install_runtime(llm, state, kv=False)
    return llm


def reference_run(python: str, bundle: dict, recipe: str, options, group_size: int, tmp: str):
    """llm-compressor's result for ``recipe`` on ``bundle`` (its JSON) and its dequantized weights."""
    path = Path(tmp) / f"{recipe}.pt"
    settings = {"group_size": group_size, "smoothing_strength": 0.5, "dampening": options.dampening, "sparsity": 0.5}
    torch.save(bundle | {"recipe": recipe, "options": settings}, path)
    result = Path(tmp) / f"{recipe}.json"
    command = [python, str(Path(__file__).parent / "llmc_reference.py"), str(path), "--out", str(result)]
    subprocess.run(command, check=True, capture_output=True)
    return json.loads(result.read_text()), torch.load(Path(tmp) / f"{recipe}.weights.pt")


def layer_row(bundle: dict, options, reference: dict) -> dict:
    """Per linear layer of the bundle's layer, mmpost's held-out error, llm-compressor's and their ratio."""
    theirs = reference["errors"]
    ours = mmpost_errors(bundle, options)
    layers = [n for n in ours if n != "layer"]
    ratio = {n: ours[n] / theirs[n] if theirs[n] else float("nan") for n in layers}
    row = {"mmpost": ours, "llmcompressor": theirs, "ratio": ratio, "worst_ratio": max(ratio.values())}
    if "two_of_four" in reference:  # below 1: llm-compressor's weights are no longer 2:4 (its GPTQ after 2:4)
        row["llmcompressor_two_of_four"] = min(reference["two_of_four"].values())
    cells = "  ".join(f"{n.split('.')[-1]} {ours[n]:.3g}/{theirs[n]:.3g}" for n in layers)
    return row | {"line": f"worst ratio {row['worst_ratio']:.3f}   {cells}"}


def whole_row(bundle: dict, options, weights: dict, float_answers: list[torch.Tensor]) -> dict:
    """The held-out answers' drift of the whole LLM compressed by mmpost and by llm-compressor, from the float
    model's ``answer_log_probs``."""
    llm, state = mmpost_compress(bundle, options)
    ours = answer_drift(float_answers, llm, bundle["held_out"])
    theirs = answer_drift(float_answers, with_weights(bundle, weights, state), bundle["held_out"])
    ratio = ours["kl_to_float"] / theirs["kl_to_float"]
    line = (
        f"kl mmpost {ours['kl_to_float']:.4g}  llm-compressor {theirs['kl_to_float']:.4g}  ratio {ratio:.3f}  "
        f"greedy agreement {ours['greedy_agreement']:.4f}/{theirs['greedy_agreement']:.4f}"
    )
    return {"mmpost": ours, "llmcompressor": theirs, "ratio": ratio, "line": line}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a finished run directory (final/ and config.yaml)")
    parser.add_argument("--reference-python", required=True, help="python of an environment with llmcompressor")
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--whole", action="store_true", help="compress the whole LLM and compare the answers' drift")
    parser.add_argument(
        "--text-calib", action="store_true", help="calibrate on the samples without their media (text-only tools)"
    )
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--held-out", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--calib", help="calibration data (.json / .jsonl) when RUN is a model directory")
    parser.add_argument("--held-out-data", help="held-out data when RUN is a model directory")
    parser.add_argument("--image-root", default="", help="folder the data's image paths are relative to")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    from mmpost.cli import quiet_libraries
    from mmpost.config import load_config
    from mmpost.data.loader import read_source
    from mmpost.model.build import load_lmm
    from mmpost.model.format import resolve_model_dir
    from mmpost.quant import load_options

    quiet_libraries()
    torch.manual_seed(0)
    run = Path(args.run)
    from_run = (run / "config.yaml").is_file()
    if from_run:
        cfg = load_config(run / "config.yaml")
        train, evaluation = cfg.data.train, cfg.data.eval
        model = load_lmm(resolve_model_dir(run)).eval()
    else:
        from mmpost.config.schema import DataSourceConfig

        if not (args.calib and args.held_out_data):
            parser.error("a model directory needs --calib and --held-out-data")
        train = DataSourceConfig(path=args.calib, image_root=args.image_root)
        evaluation = DataSourceConfig(path=args.held_out_data, image_root=args.image_root)
        model = load_lmm(run).eval()
    calib = read_source(train, "data.train" if from_run else "--calib")[: args.calib_samples]
    held_out = read_source(evaluation, "data.eval" if from_run else "--held-out-data")[: args.held_out]
    if args.text_calib:
        from mmpost.quant.calibrate import text_only

        calib = [text_only(sample) for sample in calib]
    layer = None if args.whole else args.layer
    bundle = make_bundle(
        model, layer, layer_states(model, calib, layer or 0), layer_states(model, held_out, layer or 0)
    )
    rows = {}
    if args.whole:  # round to nearest, the baseline the calibrated methods should beat
        float_answers = answer_log_probs(bundle_model(bundle), bundle["held_out"])
        rtn = replace(load_options("w4a16"), group_size=args.group_size)
        rows["rtn_w4a16"] = {"mmpost": answer_drift(float_answers, mmpost_compress(bundle, rtn)[0], bundle["held_out"])}
        print(f"{'rtn_w4a16':<24} mmpost kl {rows['rtn_w4a16']['mmpost']['kl_to_float']:.4g}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes.split(","):
            preset, overrides = RECIPES[recipe]
            options = replace(
                load_options(preset), group_size=load_options(preset).group_size and args.group_size, **overrides
            )
            reference, weights = reference_run(args.reference_python, bundle, recipe, options, args.group_size, tmp)
            if args.whole:
                rows[recipe] = whole_row(bundle, options, weights, float_answers)
            else:
                rows[recipe] = layer_row(bundle, options, reference)
            print(f"{recipe:<24} {rows[recipe].pop('line')}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
