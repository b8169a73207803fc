"""The quantize pass: compression of the LLM inside an LMM, in place.

The LLM's linear layers get float weights equal to what the compressed checkpoint holds (dequantized integers
or FP8 values, pruned weights zero), so the model runs and evaluates as before and its logits are those a serving
engine computes from the checkpoint; activation and KV-cache quantization are hooks on the LLM
(``mmpost.model.quantized.install_runtime``). ``model.quantization`` keeps the scales for saving. Encoders,
connectors, embeddings and, by default, ``lm_head`` stay in float.

Calibrated methods go decoder layer by decoder layer: for layer i, the calibration batches run through the whole
LMM (media encoded and connected, earlier layers already compressed) up to layer i and its linear layers' inputs
are gathered. SmoothQuant's or AWQ's scales come first, layer by layer through the float model, as AWQ's paper
and llm-compressor search them; then, layer by layer again, each layer's inputs are gathered through the scaled
and already compressed earlier layers, and it is pruned (SparseGPT, Wanda) and rounded (GPTQ, or round to
nearest). Searching AWQ's scales on inputs that carried the earlier layers' rounding instead drifted more at the
end (KL to float on held-out answers 7.5e-6 against 5.3e-6 on an 8-layer model; ``tools/quant_reference.py
--whole``). Running from the start for every layer costs more than replaying stored layer inputs, but works for any
decoder and for fusion connectors, whose cross-attention runs inside the decoder's layers.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from mmpost.data.sample import Sample
from mmpost.model.lmm import LMM
from mmpost.model.lora import merge_adapters
from mmpost.model.quantized import QuantState, install_runtime, selected_linears
from mmpost.quant.calibrate import calibration_batches, layer_inputs
from mmpost.quant.kv import kv_scales
from mmpost.quant.methods import QuantizedWeight, check_group_size, gptq, reconstruction_error, rtn
from mmpost.quant.options import QuantizeOptions
from mmpost.quant.prune import check_structure, sparsegpt, wanda
from mmpost.quant.sensitivity import token_weights
from mmpost.quant.smooth import apply_scales, awq_search, mappings, smoothquant_scales, smoothquant_search

log = logging.getLogger("mmpost")

NO_MEDIA_WARNING = (
    "calibration: the model reads {modalities} but no calibration sample has media, so the LLM is calibrated "
    "on text activations only and never sees the media tokens it gets in serving; the method then fits "
    "it to text. Pass samples with media (the training data of the run) unless that is what you want"
)


@dataclass
class QuantReport:
    """What the pass did, for logs and the export report.

    Attributes:
        scheme: e.g. "int4 sym g64 (gptq, multimodal calibration)".
        layers: number of quantized linear layers.
        samples: calibration samples used (0 for rtn).
        rows, media_rows: input rows (tokens) of the calibration set, and how many were media tokens.
        media_rows_by_layer: gptq only; media-token rows each quantized layer received.
        modality_weights: modality-balanced searches; per block (attention, MLP) the weight of a media token's and
            of a text token's output error (``mmpost.quant.sensitivity``); the summary gives the blocks' median
            ratio of the two (``media_vs_text_weight``).
        errors: calibrated methods; per layer, the relative output error on its calibration inputs of the
            compressed weights (``final``) and of round-to-nearest's alone on the same inputs (``rtn``; absent
            when the weights stay float).
        smoothing: per smoothed group of layers (named by its first), AWQ's chosen ratio and its parent's output
            error against round-to-nearest's, or SmoothQuant's largest scale; the summary gives AWQ's mean ratio of
            the two (``awq_error_vs_rtn``).
        seconds: time taken.
    """

    scheme: str
    layers: int
    samples: int = 0
    rows: int = 0
    media_rows: int = 0
    errors: dict[str, dict[str, float]] = field(default_factory=dict)
    smoothing: dict[str, dict[str, float]] = field(default_factory=dict)
    sparsity: float | None = None
    media_rows_by_layer: dict[str, int] = field(default_factory=dict)
    modality_weights: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        hidden = ("errors", "media_rows_by_layer", "smoothing", "modality_weights")
        out = {k: v for k, v in asdict(self).items() if k not in hidden and v is not None}
        if self.errors:
            out["mean_error"] = sum(e["final"] for e in self.errors.values()) / len(self.errors)
            if all("rtn" in e for e in self.errors.values()):
                out["mean_error_rtn"] = sum(e["rtn"] for e in self.errors.values()) / len(self.errors)
        awq = [e["error"] / e["rtn"] for e in self.smoothing.values() if "awq_ratio" in e and e["rtn"] > 0]
        if awq:  # the rounding alone happens on AWQ's scaled weights, so ``errors`` cannot show what the scales gain
            out["awq_error_vs_rtn"] = sum(awq) / len(awq)
        if self.modality_weights:  # the blocks' median weight of a media token's error over a text token's
            ratios = [w["media"] / w["text"] for w in self.modality_weights.values() if w["text"] > 0]
            if ratios:
                out["media_vs_text_weight"] = statistics.median_high(ratios)
        return out


def is_quantized(model: LMM) -> bool:
    return model.quantization is not None or getattr(model.base_llm.config, "quantization_config", None) is not None


def quantize(
    model: LMM, options: QuantizeOptions, samples: list[Sample] | None = None, progress: bool = True
) -> QuantReport:
    """Compresses ``model``'s LLM in place (LoRA adapters are merged first) and returns what was done.

    Args:
        samples: calibration conversations with their media; needed by every method but plain rtn.

    Raises:
        ValueError: before any work, when the model is already quantized, when a calibrated method has no
            samples, when a group size or a 2:4 pattern does not fit a layer's input width (naming the layer),
            or when a tied ``lm_head`` is selected.
    """
    if is_quantized(model):
        held = model.quantization.describe() if model.quantization else "a quantization_config"
        raise ValueError(
            f"the model is already quantized ({held}); quantizing its dequantized weights again would compound "
            "the rounding error. Quantize the float model it came from"
        )
    if options.calibrated and not samples:
        raise ValueError(
            f"{options.method_label()} needs calibration samples (--calib, or a run whose training data it can use)"
        )
    start = time.perf_counter()
    model.eval()
    if model.has_lora:
        model.llm = merge_adapters(model.llm)
        model.lora_config = None
    linears = selected_linears(model.base_llm, options.ignore)
    if not linears:
        raise ValueError(f"quantize: no linear layer of the LLM is left once ignore {options.ignore} is applied")
    tied = model.base_llm.get_output_embeddings()
    for name, module in linears.items():
        if module is tied and getattr(model.base_llm.config, "tie_word_embeddings", False):
            raise ValueError(f"{name} shares its weights with the input embeddings; keep it in ignore")
        if options.scheme is not None:
            check_group_size(name, module.in_features, options.scheme)
        if options.pruned:
            check_structure(name, module.in_features, options.sparsity_structure)
    state = options.new_state()
    report = QuantReport(scheme=options.describe(), layers=len(linears))
    with torch.no_grad():
        if not options.calibrated:
            for name, module in linears.items():
                set_weight(module, rtn(module.weight, options.scheme), state, name)
        else:
            batches = calibration_batches(
                model,
                samples,
                options.num_samples,
                options.batch_size,
                options.max_length,
                options.calibration == "text",
            )
            if model.modalities and options.calibration != "text" and not any(b.media for b in batches):
                log.warning(NO_MEDIA_WARNING.format(modalities=", ".join(model.modalities)))
            report.samples = sum(len(b.ids) for b in batches)
            if options.bits is not None or options.pruned:
                compress_layers(model, options, batches, linears, state, report, progress)
            if options.kv_cache:
                state.kv_scales = kv_scales(model, batches)
    if options.pruned:
        zeros = sum(int((linears[n].weight == 0).sum()) for n in state.sparse_layers)
        state.sparsity_ratio = zeros / sum(linears[n].weight.numel() for n in state.sparse_layers)
        report.sparsity = round(state.sparsity_ratio, 4)
    model.quantization = state
    state.runtime = install_runtime(model.base_llm, state)
    report.seconds = round(time.perf_counter() - start, 2)
    log.info("compressed %d layers: %s", len(linears), report.summary())
    return report


def set_weight(module: torch.nn.Linear, quantized: QuantizedWeight, state: QuantState, name: str) -> None:
    module.weight.data.copy_(quantized.weight.to(module.weight.dtype))
    state.layers[name] = (quantized.scale, quantized.zero_point)


def compress_layers(
    model: LMM,
    options: QuantizeOptions,
    batches: list,
    linears: dict[str, torch.nn.Linear],
    state: QuantState,
    report: QuantReport,
    progress: bool,
) -> None:
    """The calibrated methods, decoder layer by decoder layer; selected linears outside the decoder layers (none in
    the usual layout, ``lm_head`` being ignored) get round-to-nearest and stay dense."""
    by_module = {id(m): name for name, m in linears.items()}
    names = {id(m): name for name, m in model.base_llm.named_modules()}
    done: set[str] = set()
    layers = model.base_llm.get_decoder().layers
    balance = {}
    if options.balanced:
        blocks = [p.parent for layer in layers for p in mappings(layer, names[id(layer)], linears)]
        balance = token_weights(model, batches, list({id(b): b for b in blocks}.values()), options.balance)
        report.modality_weights = {
            names[id(b)]: {"media": balance[id(b)].media, "text": balance[id(b)].text} for b in blocks
        }
    owned = [(layer, {by_module[id(m)]: m for m in layer.modules() if id(m) in by_module}) for layer in layers]
    owned = [(layer, mine) for layer, mine in owned if mine]
    if options.smoothing is not None or (options.method == "awq" and options.bits is not None):
        # every layer's scales first, on the float model's inputs (as AWQ's paper and llm-compressor search them),
        # then the rounding, on inputs that carry the earlier layers' rounding
        for layer, mine in tqdm(owned, desc="smoothing", unit="layer", disable=not progress):
            smooth_layer(model, options, batches, layer, names[id(layer)], mine, report, balance)
    for layer, mine in tqdm(owned, desc=options.method_label(), unit="layer", disable=not progress):
        stats, _ = layer_inputs(model, batches, layer, mine)
        for name, module in mine.items():
            compress_one(name, module, stats[name].hessian, options, state, report)
            report.media_rows_by_layer[name] = stats[name].media_rows
            done.add(name)
        first = next(iter(stats.values()))  # every layer sees the same tokens
        report.rows, report.media_rows = first.rows, first.media_rows
    for name in linears.keys() - done:
        log.info("quantize: %s is outside the decoder layers and gets round-to-nearest", name)
        if options.scheme is not None:
            set_weight(linears[name], rtn(linears[name].weight, options.scheme), state, name)


def smooth_layer(
    model: LMM, options: QuantizeOptions, batches, layer, prefix: str, mine: dict, report, balance: dict
) -> None:
    """SmoothQuant's or AWQ's scales for the decoder layer's pairs, from its float inputs; ``balance``: each
    block's token weights (``BlockWeights`` by ``id``) that the searches use."""
    pairs = mappings(layer, prefix, mine)
    awq = options.method == "awq"
    parents = [p.parent for p in pairs] if awq or options.smoothing_search else []
    row_weights = {p.names[0]: balance[id(p.parent)].rows for p in pairs if id(p.parent) in balance}
    stats, cached = layer_inputs(model, batches, layer, {p.names[0]: p.balance[0] for p in pairs}, parents, row_weights)
    for pair, replay in zip(pairs, cached or [None] * len(pairs), strict=True):
        first = pair.names[0]
        weights = row_weights.get(first)
        if options.smoothing is not None and pair.norm_fed:
            if options.smoothing_search:
                activations = options.activation_scheme
                chosen = smoothquant_search(
                    pair, stats[first].abs_max, replay.replay, options.scheme, activations, weights
                )
                scales = chosen.scales
                report.smoothing[first] = {
                    "alpha": chosen.alpha,
                    "error": chosen.error,
                    "none": chosen.unsmoothed_error,
                }
            else:
                scales = smoothquant_scales(pair, stats[first].abs_max, options.smoothing)
                report.smoothing[first] = {"smoothquant_max_scale": float(scales.max())}
            apply_scales(pair, scales)
        if awq:
            # abs_mean, what AWQ weighs channels by, counts each token by its weight when balanced
            found = awq_search(pair, stats[first].abs_mean, replay.replay, options.scheme, options.awq_grid, weights)
            apply_scales(pair, found.scales)
            report.smoothing[first] = {"awq_ratio": found.ratio, "error": found.error, "rtn": found.identity_error}


def compress_one(name: str, module, hessian: torch.Tensor, options: QuantizeOptions, state: QuantState, report):
    """Prunes, then rounds, one layer on its calibration inputs; records its output error."""
    weight = module.weight.detach().float().clone()  # the float weight, kept for the error once it is replaced
    stored = module.weight.dtype  # the checkpoint keeps the scales in the layer's dtype
    current, mask = weight, None
    if options.pruned:
        if options.pruning == "wanda":
            current, mask = wanda(weight, torch.diagonal(hessian), options.sparsity, options.sparsity_structure)
        else:
            current, mask = sparsegpt(
                weight, hessian, options.sparsity, options.sparsity_structure, options.block_size, options.dampening
            )
        state.sparse_layers.append(name)
    errors = {}
    if options.scheme is None:
        module.weight.data.copy_(current.to(module.weight.dtype))
        final = current
    else:
        if options.method == "gptq":
            quantized = gptq(
                current,
                hessian,
                options.scheme,
                options.block_size,
                options.dampening,
                options.act_order,
                mask,
                scale_dtype=stored,
            )
        else:
            quantized = rtn(current, options.scheme, stored)
        set_weight(module, quantized, state, name)
        final = quantized.weight.float()
        errors["rtn"] = reconstruction_error(weight, rtn(weight, options.scheme, stored).weight.float(), hessian)
    report.errors[name] = {"final": reconstruction_error(weight, final, hessian), **errors}
