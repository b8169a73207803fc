"""What the quantize pass does: a preset name (``w4a16-gptq``) or a YAML file of ``QuantizeOptions`` keys."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from mmpost.config.fields import ranged
from mmpost.config.schema import DataSourceConfig
from mmpost.model.quantized import WeightScheme


@dataclass
class QuantizeOptions:
    """Weight-only post-training quantization of the LLM's linear layers.

    Attributes:
        bits: 4 or 8 bits per weight (activations stay in the model's float dtype: "w4a16", "w8a16").
        symmetric: symmetric integers around zero (one scale per group); false adds a zero point.
        group_size: input columns that share one scale; null gives one scale per output channel.
            Must divide the input width of every quantized layer.
        method: rtn (round to nearest, no data) or gptq (rounding that compensates each column's error
            on the calibration inputs, Frantar et al. 2022).
        ignore: regular expressions, searched in the LLM's module names (``model.layers.0.mlp.down_proj``),
            of linear layers kept in float. Encoders, connectors and embeddings are never quantized.
        calibration: gptq only. multimodal runs the calibration samples through the whole LMM, so the
            LLM's layers see media tokens as in serving; text drops the media and their placeholders from
            the same samples, as text-only tools calibrate (to measure what that costs).
        calib: gptq only. The calibration samples (a .json / .jsonl file or shards); an empty path means the
            run's training data when quantizing a run.
        num_samples: gptq only. Calibration samples used (the first ones).
        batch_size: gptq only. Calibration samples per forward.
        max_length: gptq only. Longest calibration sequence in tokens, media tokens included.
        dampening: gptq only. Fraction of the mean Hessian diagonal added to it before inversion; above 0,
            since a Hessian that fails to invert is retried with ten times the dampening.
        block_size: gptq only. Columns updated together (speed only; the result is the same).
        act_order: gptq only. Quantize columns in order of decreasing input energy (static groups).
    """

    bits: Literal[4, 8] = 4
    symmetric: bool = True
    group_size: int | None = ranged(64, ge=1)
    method: Literal["rtn", "gptq"] = "gptq"
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
    def scheme(self) -> WeightScheme:
        return WeightScheme(bits=self.bits, symmetric=self.symmetric, group_size=self.group_size)

    def describe(self) -> str:
        how = f"gptq, {self.calibration} calibration" if self.method == "gptq" else "rtn"
        return f"{self.scheme.describe()} ({how})"


PRESETS: dict[str, QuantizeOptions] = {
    "w8a16": QuantizeOptions(bits=8, group_size=None, method="rtn"),
    "w8a16-gptq": QuantizeOptions(bits=8, group_size=None, method="gptq"),
    "w4a16": QuantizeOptions(bits=4, group_size=64, method="rtn"),
    "w4a16-gptq": QuantizeOptions(bits=4, group_size=64, method="gptq"),
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
    if options.bits not in (4, 8):
        raise ValueError(f"quantize bits must be 4 or 8, got {options.bits}")
    if options.group_size is not None and options.group_size <= 0:
        raise ValueError(f"quantize group_size must be positive or null (per channel), got {options.group_size}")
    return options
