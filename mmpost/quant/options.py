"""What the quantize pass does: a preset name (``w4a16-gptq``) or a YAML file of ``QuantizeOptions`` keys."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from mmpost.config.fields import ranged
from mmpost.config.schema import DataSourceConfig
from mmpost.model.quantized import ActivationScheme, QuantState, WeightScheme


@dataclass
class QuantizeOptions:
    """Post-training compression of the LLM's linear layers: quantized weights, optionally quantized activations
    and KV cache, optionally pruned weights.

    Attributes:
        bits: 4 or 8 bits per weight; null leaves the weights in float (pruning and / or the KV cache only).
        type: int, or float for FP8 (E4M3) weights (bits 8, symmetric).
        symmetric: symmetric integers around zero (one scale per group); false adds a zero point.
        group_size: input columns that share one scale; null gives one scale per output channel.
            Must divide the input width of every quantized layer.
        activations: quantize each quantized layer's inputs at run time, one scale per token (W8A8 with int
            weights, FP8 with float weights); needs bits 8. Without it the activations stay in the model's float
            dtype ("w4a16", "w8a16").
        method: how the weights are rounded. rtn (round to nearest, no data), gptq (rounding that compensates each
            column's error on the calibration inputs, Frantar et al. 2022) or awq (activation-aware scales found
            on the calibration inputs, Lin et al. 2023, then round to nearest).
        smoothing: SmoothQuant's migration strength α in (0, 1) (Xiao et al. 2022): before the weights are
            rounded, the norm-fed layers' input outliers are moved into their weights; null for none. For
            quantized activations (W8A8); 0.5 is the paper's default.
        smoothing_search: with smoothing, search α for each pair of layers instead (0.05, 0.10, ..., 0.95): the α
            whose smoothed layers, weights rounded and inputs quantized per token as in serving, reproduce the
            block's float outputs best on the calibration inputs. smoothing's value is then unused.
        awq_grid: awq only. Points of the scale search (llm-compressor's default 20).
        balance: how the searches (awq, smoothing_search) weigh each calibration token's output error: by how
            much the answer depends on the block's output there, the squared gradient of the answer cross-entropy
            from one backward pass of the float model (``mmpost.quant.sensitivity``). modality gives each token its
            modality's mean (media or text, as MBQ, Li et al. 2025, proposes for vision-language models; without
            media in the calibration it changes nothing); token gives each token its own; none (the default) counts
            every token alike, the methods' own measure. Measured: modality lowered AWQ's drift on the demo model
            and raised it 4 times on a larger one (README), so it is not the default.
        sparsity: fraction of each layer's weights pruned (0 for none). 2:4 structure prunes exactly 0.5.
        sparsity_structure: 2:4 (two of every four consecutive weights of a row, what sparse tensor cores run) or
            unstructured.
        pruning: sparsegpt (prunes and updates the kept weights to compensate, Frantar & Alistarh 2023) or wanda
            (prunes by |weight| x input norm, keeps the rest, Sun et al. 2023). Pruning comes before
            quantization, and the quantizer keeps the pruned weights zero.
        kv_cache: FP8 keys and values with a scale per attention layer calibrated on the samples (vLLM's
            ``kv_cache_dtype: fp8``).
        ignore: regular expressions, searched in the LLM's module names (``model.layers.0.mlp.down_proj``),
            of linear layers kept in float and dense. Encoders, connectors and embeddings are never compressed.
        calibration: multimodal runs the calibration samples through the whole LMM, so the LLM's layers see
            media tokens as in serving; text drops the media and their placeholders from the same samples, as
            text-only tools calibrate (to measure what that costs). Every method but rtn calibrates.
        calib: The calibration samples (a .json / .jsonl file or shards); an empty path means the run's training
            data when quantizing a run.
        num_samples: Calibration samples used (the first ones).
        batch_size: Calibration samples per forward.
        max_length: Longest calibration sequence in tokens, media tokens included.
        dampening: gptq and sparsegpt. Fraction of the mean Hessian diagonal added to it before inversion; above
            0, since a Hessian that fails to invert is retried with ten times the dampening.
        block_size: gptq and sparsegpt. Columns updated together (gptq: speed only; sparsegpt: also the span over
            which unstructured sparsity picks its weights).
        act_order: gptq only. Quantize columns in order of decreasing input energy (static groups).
    """

    bits: Literal[4, 8] | None = 4
    type: Literal["int", "float"] = "int"
    symmetric: bool = True
    group_size: int | None = ranged(64, ge=1)
    activations: bool = False
    method: Literal["rtn", "gptq", "awq"] = "gptq"
    smoothing: float | None = ranged(None, gt=0.0, lt=1.0)
    smoothing_search: bool = False
    awq_grid: int = ranged(20, ge=2)
    balance: Literal["modality", "token", "none"] = "none"
    sparsity: float = ranged(0.0, ge=0.0, lt=1.0)
    sparsity_structure: Literal["2:4", "unstructured"] = "unstructured"
    pruning: Literal["sparsegpt", "wanda"] = "sparsegpt"
    kv_cache: bool = False
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])
    calibration: Literal["multimodal", "text"] = "multimodal"
    calib: DataSourceConfig = field(default_factory=DataSourceConfig)
    num_samples: int = ranged(128, ge=1)
    batch_size: int = ranged(8, ge=1)
    max_length: int = ranged(1024, ge=2)
    dampening: float = ranged(0.01, gt=0)
    block_size: int = ranged(128, ge=1)
    act_order: bool = False

    @property
    def scheme(self) -> WeightScheme | None:
        if self.bits is None:
            return None
        return WeightScheme(bits=self.bits, symmetric=self.symmetric, group_size=self.group_size, type=self.type)

    @property
    def activation_scheme(self) -> ActivationScheme | None:
        return ActivationScheme(type=self.type) if self.activations else None

    def new_state(self) -> QuantState:
        """An empty ``QuantState`` for this scheme, which the quantize pass fills layer by layer."""
        return QuantState(
            scheme=self.scheme,
            ignore=list(self.ignore),
            method=self.method_label(),
            activations=self.activation_scheme,
            sparsity=self.sparsity_structure if self.pruned else None,
        )

    @property
    def searches(self) -> bool:
        """Whether a search picks scales on the calibration outputs (AWQ, SmoothQuant's α search)."""
        return (self.method == "awq" and self.bits is not None) or (
            self.smoothing is not None and self.smoothing_search
        )

    @property
    def balanced(self) -> bool:
        """Whether the searches weigh tokens by the answer's sensitivity to them."""
        by_modality = self.balance == "modality" and self.calibration == "multimodal"
        return self.searches and (by_modality or self.balance == "token")

    @property
    def pruned(self) -> bool:
        return self.sparsity > 0

    @property
    def calibrated(self) -> bool:
        """Whether the pass needs calibration samples."""
        weights = self.bits is not None and self.method != "rtn"
        return weights or self.smoothing is not None or self.pruned or self.kv_cache

    def method_label(self) -> str:
        """How the weights are chosen, e.g. ``smoothquant+gptq`` or ``sparsegpt 2:4+gptq``."""
        steps = []
        if self.smoothing is not None:
            steps.append("smoothquant searched" if self.smoothing_search else f"smoothquant {self.smoothing:g}")
        if self.pruned:
            steps.append(f"{self.pruning} {self.sparsity_structure}")
        if self.bits is not None:
            steps.append(self.method)
        return "+".join(steps) or "none"

    def describe(self) -> str:
        parts = [self.scheme.describe()] if self.scheme else ["float weights"]
        if self.activations:
            parts.append(self.activation_scheme.describe())
        if self.kv_cache:
            parts.append("fp8 kv cache")
        how = self.method_label() + (f", {self.calibration} calibration" if self.calibrated else "")
        if self.balanced:
            how += f", {self.balance}-balanced"
        return f"{', '.join(parts)} ({how})"


PRESETS: dict[str, QuantizeOptions] = {
    "w8a16": QuantizeOptions(bits=8, group_size=None, method="rtn"),
    "w8a16-gptq": QuantizeOptions(bits=8, group_size=None, method="gptq"),
    "w4a16": QuantizeOptions(bits=4, group_size=64, method="rtn"),
    "w4a16-gptq": QuantizeOptions(bits=4, group_size=64, method="gptq"),
    "w4a16-awq": QuantizeOptions(bits=4, group_size=64, method="awq"),
    "w8a8": QuantizeOptions(bits=8, group_size=None, activations=True, method="gptq", smoothing=0.5),
    "w8a8-rtn": QuantizeOptions(bits=8, group_size=None, activations=True, method="rtn"),
    "fp8": QuantizeOptions(bits=8, type="float", group_size=None, activations=True, method="rtn"),
    "fp8-kv": QuantizeOptions(bits=8, type="float", group_size=None, activations=True, method="rtn", kv_cache=True),
    "sparse24": QuantizeOptions(bits=None, sparsity=0.5, sparsity_structure="2:4"),
    "sparse24-wanda": QuantizeOptions(bits=None, sparsity=0.5, sparsity_structure="2:4", pruning="wanda"),
    "sparse24-w4a16": QuantizeOptions(bits=4, group_size=64, sparsity=0.5, sparsity_structure="2:4"),
}


def load_options(spec: str | QuantizeOptions, **overrides) -> QuantizeOptions:
    """A preset name, a YAML file of ``QuantizeOptions`` keys, or options themselves; then ``overrides``.

    Raises:
        ValueError: naming the presets when ``spec`` is neither a preset nor an existing file, or naming
            the key of a YAML file that is wrong.
    """
    from mmpost.config.loader import from_dict, read_yaml

    if isinstance(spec, QuantizeOptions):
        options = spec
    elif spec in PRESETS:
        options = PRESETS[spec]
    elif Path(spec).suffix in (".yaml", ".yml") and Path(spec).is_file():
        options = from_dict(QuantizeOptions, read_yaml(spec), where=str(spec))
    else:
        raise ValueError(f"--quantize {spec!r}: use a preset ({', '.join(PRESETS)}) or a .yaml file of quantize keys")
    options = replace(options, **{k: v for k, v in overrides.items() if v is not None})
    check_options(options)
    return options


def check_options(options: QuantizeOptions) -> None:
    """Refuses a combination no checkpoint format or method carries, saying which keys to change."""
    o = options
    if o.bits not in (4, 8, None):
        raise ValueError(f"quantize bits must be 4, 8 or null (float weights), got {o.bits}")
    if o.group_size is not None and o.group_size <= 0:
        raise ValueError(f"quantize group_size must be positive or null (per channel), got {o.group_size}")
    if o.type == "float" and (o.bits != 8 or not o.symmetric):
        raise ValueError("quantize type float is FP8: bits 8 and symmetric true")
    if o.activations and o.bits != 8:
        raise ValueError(f"quantize activations: true quantizes inputs to 8 bits and needs bits 8, got {o.bits}")
    if o.method == "awq" and o.smoothing is not None:
        raise ValueError(
            "quantize method awq with smoothing: both scale the same layers' inputs; use one (w8a8 smooths, then "
            "rounds with gptq)"
        )
    if o.smoothing_search and (o.smoothing is None or not o.activations):
        raise ValueError("quantize smoothing_search needs smoothing (any α, e.g. 0.5) and activations: true")
    if o.smoothing is not None and not 0 < o.smoothing < 1:
        raise ValueError(f"quantize smoothing (SmoothQuant's alpha) must be in (0, 1), got {o.smoothing}")
    if o.bits is None and (o.activations or o.smoothing is not None or o.method == "awq"):
        raise ValueError("quantize bits: null keeps the weights in float; activations, smoothing and awq need bits")
    if o.sparsity_structure == "2:4" and o.sparsity not in (0.0, 0.5):
        raise ValueError(f"2:4 sparsity prunes exactly half the weights: set sparsity 0.5, got {o.sparsity}")
    if o.bits is None and not o.pruned and not o.kv_cache:
        raise ValueError("quantize: bits null with no sparsity and no kv_cache leaves nothing to do")
