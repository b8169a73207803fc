"""The quantize pass: weight-only int8 / int4 quantization of the LLM inside an LMM, in place.

The LLM's linear layers get float weights equal to their dequantized integers, so the model runs and
evaluates as before and its logits are those a serving engine computes from the packed checkpoint;
``model.quantization`` keeps the scales for saving (``mmpost.model.quantized``). Encoders, connectors,
embeddings and, by default, ``lm_head`` stay in float.

GPTQ goes layer by layer: for decoder layer i, the calibration batches run through the whole LMM (media
encoded and connected, earlier layers already quantized) up to layer i, its linear layers' input
statistics are gathered, and its weights are quantized. Running from the start for every layer costs
more than replaying stored layer inputs, but works for any decoder and for fusion connectors, whose
cross-attention runs inside the decoder's layers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from mmpost.data.sample import Sample
from mmpost.model.lmm import LMM
from mmpost.model.lora import merge_adapters
from mmpost.model.quantized import QuantState, selected_linears
from mmpost.quant.calibrate import calibration_batches, layer_inputs
from mmpost.quant.methods import check_group_size, gptq, reconstruction_error, rtn
from mmpost.quant.options import QuantizeOptions

log = logging.getLogger("mmpost")

NO_MEDIA_WARNING = (
    "calibration: the model reads {modalities} but no calibration sample has media, so the LLM is calibrated "
    "on text activations only and never sees the media tokens it gets in serving; GPTQ then fits its "
    "rounding to text. Pass samples with media (the training data of the run) unless that is what you want"
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
        errors: gptq only; per layer, the relative output error on its calibration inputs of GPTQ's
            weights and of round-to-nearest's on the same inputs.
        seconds: time taken.
    """

    scheme: str
    layers: int
    samples: int = 0
    rows: int = 0
    media_rows: int = 0
    errors: dict[str, dict[str, float]] = field(default_factory=dict)
    media_rows_by_layer: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("errors", "media_rows_by_layer")}
        if self.errors:
            out["mean_error_gptq"] = sum(e["gptq"] for e in self.errors.values()) / len(self.errors)
            out["mean_error_rtn"] = sum(e["rtn"] for e in self.errors.values()) / len(self.errors)
        return out


def is_quantized(model: LMM) -> bool:
    return model.quantization is not None or getattr(model.base_llm.config, "quantization_config", None) is not None


def quantize(
    model: LMM, options: QuantizeOptions, samples: list[Sample] | None = None, progress: bool = True
) -> QuantReport:
    """Quantizes ``model``'s LLM in place (LoRA adapters are merged first) and returns what was done.

    Args:
        samples: calibration conversations with their media; needed by gptq, unused by rtn.

    Raises:
        ValueError: when the model is already quantized, when gptq has no samples, when a group size does
            not divide a layer's input width (naming the layer), or when a tied ``lm_head`` is selected.
    """
    if is_quantized(model):
        held = model.quantization.describe() if model.quantization else "a quantization_config"
        raise ValueError(
            f"the model is already quantized ({held}); quantizing its dequantized weights again would compound "
            "the rounding error. Quantize the float model it came from"
        )
    if options.method == "gptq" and not samples:
        raise ValueError("gptq needs calibration samples (--calib, or a run whose training data it can use)")
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
        check_group_size(name, module.in_features, options.scheme)
    state = QuantState(scheme=options.scheme, ignore=list(options.ignore), method=options.method)
    report = QuantReport(scheme=options.describe(), layers=len(linears))
    with torch.no_grad():
        if options.method == "rtn":
            for name, module in linears.items():
                set_weight(module, rtn(module.weight, options.scheme), state, name)
        else:
            run_gptq(model, options, samples, linears, state, report, progress)
    model.quantization = state
    report.seconds = round(time.perf_counter() - start, 2)
    log.info("quantized %d layers: %s", len(linears), report.summary())
    return report


def set_weight(module: torch.nn.Linear, quantized, state: QuantState, name: str) -> None:
    module.weight.data.copy_(quantized.weight.to(module.weight.dtype))
    state.layers[name] = (quantized.scale, quantized.zero_point)


def run_gptq(
    model: LMM,
    options: QuantizeOptions,
    samples: list[Sample],
    linears: dict[str, torch.nn.Linear],
    state: QuantState,
    report: QuantReport,
    progress: bool,
) -> None:
    """GPTQ decoder layer by decoder layer; selected linears outside the decoder layers get rtn."""
    text = options.calibration == "text"
    if model.modalities and not text and not any(s.media for s in samples[: options.num_samples]):
        log.warning(NO_MEDIA_WARNING.format(modalities=", ".join(model.modalities)))
    batches = calibration_batches(model, samples, options.num_samples, options.batch_size, options.max_length, text)
    report.samples = sum(len(b.ids) for b in batches)
    by_module = {id(m): name for name, m in linears.items()}
    done: set[str] = set()
    layers = model.base_llm.get_decoder().layers
    for layer in tqdm(layers, desc="gptq", unit="layer", disable=not progress):
        mine = {by_module[id(m)]: m for m in layer.modules() if id(m) in by_module}
        if not mine:
            continue
        stats = layer_inputs(model, batches, layer, mine)
        for name, module in mine.items():
            entry = stats[name]
            weight = module.weight.detach().float()
            quantized = gptq(
                weight, entry.hessian, options.scheme, options.block_size, options.dampening, options.act_order
            )
            report.errors[name] = {
                "gptq": reconstruction_error(weight, quantized.weight.float(), entry.hessian),
                "rtn": reconstruction_error(weight, rtn(weight, options.scheme).weight.float(), entry.hessian),
            }
            set_weight(module, quantized, state, name)
            done.add(name)
            report.media_rows_by_layer[name] = entry.media_rows
        first = next(iter(stats.values()))  # every layer sees the same tokens
        report.rows, report.media_rows = first.rows, first.media_rows
    for name in linears.keys() - done:
        log.info("quantize: %s is outside the decoder layers and gets round-to-nearest", name)
        set_weight(linears[name], rtn(linears[name].weight, options.scheme), state, name)
