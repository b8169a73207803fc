"""The compressed-tensors checkpoint format: writing a quantized LLM, and reading one back into mmpost.

compressed-tensors packs the integers (eight int4 or four int8 per int32) and writes the
``quantization_config`` that transformers (``CompressedTensorsHfQuantizer``) and vLLM read. mmpost
holds a quantized model as float weights equal to their dequantized integers, plus each layer's scale
and zero point (``QuantState``); packing those weights with those scales gives back the integers
exactly, so a checkpoint reloads to the same float weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class WeightScheme:
    """How a weight is quantized: integer width, symmetry, and columns per scale (None: one scale per output row)."""

    bits: int = 4
    symmetric: bool = True
    group_size: int | None = 64

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be a positive integer or null (per-channel), got {self.group_size}")

    def args(self):
        """The compressed-tensors ``QuantizationArgs`` of this scheme, as written into the checkpoint's config."""
        from compressed_tensors.quantization import QuantizationArgs

        if self.group_size is None:
            return QuantizationArgs(num_bits=self.bits, type="int", symmetric=self.symmetric, strategy="channel")
        return QuantizationArgs(
            num_bits=self.bits, type="int", symmetric=self.symmetric, strategy="group", group_size=self.group_size
        )

    def describe(self) -> str:
        """Short label for logs and reports, e.g. ``int4 sym g64`` or ``int8 asym per-channel``."""
        layout = "per-channel" if self.group_size is None else f"g{self.group_size}"
        return f"int{self.bits} {'sym' if self.symmetric else 'asym'} {layout}"


PACKED_SUFFIXES = (".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_shape", ".weight_g_idx")


@dataclass
class QuantState:
    """A model's quantized layers: its float weights are the dequantized integers of these layers.

    Attributes:
        scheme: bits, symmetry and group size, the same for every layer.
        ignore: the regular expressions of layers kept in float (``QuantizeOptions.ignore``).
        layers: per LLM module name (``model.layers.0.mlp.down_proj``), its ``(scale, zero_point)``.
        method: how the integers were chosen (rtn, gptq), for reports.
    """

    scheme: WeightScheme
    ignore: list[str]
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    method: str = "rtn"

    def describe(self) -> str:
        return f"{self.scheme.describe()} ({self.method}, {len(self.layers)} layers)"


def ignore_patterns(ignore: Iterable[str], extra: Iterable[str] = ()) -> list[str]:
    """compressed-tensors ignore entries: each regular expression searched anywhere in a module name."""
    return [f"re:.*{pattern}" for pattern in [*ignore, *extra]]


def selected_linears(model: nn.Module, ignore: Iterable[str]) -> dict[str, nn.Linear]:
    """The linear layers of ``model`` that the scheme quantizes, chosen with compressed-tensors' own matcher
    so that the layers mmpost quantizes are the layers a loader of the checkpoint expects quantized."""
    from compressed_tensors.utils.match import is_match

    patterns = ignore_patterns(ignore)
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and is_match(name, module, ["Linear"], patterns)
    }


def save_compressed(
    hf_model: nn.Module,
    out: Path,
    state: QuantState,
    rename: Callable[[str], str] = lambda name: name,
    extra_ignore: Iterable[str] = (),
) -> None:
    """Packs ``hf_model``'s quantized layers and writes it with ``save_pretrained`` plus its quantization config.

    ``hf_model`` is a fresh transformers model holding the quantized float weights (it is changed: its
    layers are replaced by packed ones). ``rename`` maps mmpost's LLM module names to ``hf_model``'s; the
    ``extra_ignore`` patterns keep its other parts (vision tower, projector) in float.

    Raises:
        ValueError: if the layers compressed-tensors would quantize differ from the quantized ones.
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )

    ignore = ignore_patterns(state.ignore, extra_ignore)
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=state.scheme.args())},
        ignore=ignore,
        quantization_status=QuantizationStatus.INITIALIZED,
    )
    apply_quantization_config(hf_model, config, show_progress=False)
    expected = {rename(name): params for name, params in state.layers.items()}
    marked = {name for name, module in hf_model.named_modules() if hasattr(module, "quantization_scheme")}
    if marked != set(expected):
        raise ValueError(
            f"the checkpoint would quantize other layers than mmpost did: only in the checkpoint "
            f"{sorted(marked - set(expected))[:3]}, only in mmpost {sorted(set(expected) - marked)[:3]}"
        )
    for name, (scale, zero_point) in expected.items():
        module = hf_model.get_submodule(name)
        module.weight_scale.data = scale.to(module.weight_scale.dtype)
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data = zero_point.to(module.weight_zero_point.dtype)
    compressor = ModelCompressor.from_pretrained_model(hf_model, quantization_format="pack-quantized")
    compressor.compress_model(hf_model)
    hf_model.save_pretrained(out)
    # The ignore list compressed-tensors derives uses checkpoint key names, which differ from module
    # names at load time for composite models (LLaVA); ours matches both.
    compressor.quantization_config.ignore = ignore
    compressor.update_config(str(out))


def adopt_loaded(llm: nn.Module) -> QuantState | None:
    """Turns a transformers model loaded from a compressed-tensors checkpoint into a plain float model.

    Its layers get their dequantized weights and lose the quantization parameters; the scales and zero
    points move into the returned ``QuantState`` (None when ``llm`` is not quantized). Afterwards the
    model runs like any float model, through any of its submodules (the decompression hook transformers
    installs fires only on the top-level forward).
    """
    quantizer = getattr(llm, "hf_quantizer", None)
    if quantizer is None or getattr(quantizer, "compressor", None) is None:
        return None
    quantizer.compressor.decompress_model(llm)
    ct = quantizer.compressor.quantization_config
    scheme_args = next(iter(ct.config_groups.values())).weights
    scheme = WeightScheme(bits=scheme_args.num_bits, symmetric=scheme_args.symmetric, group_size=scheme_args.group_size)
    ignore = [p.removeprefix("re:.*") for p in ct.ignore if p.startswith("re:.*")]
    state = QuantState(scheme=scheme, ignore=ignore, method="loaded")  # the checkpoint does not say rtn or gptq
    for name, module in llm.named_modules():
        if not hasattr(module, "quantization_scheme"):
            continue
        scale = module.weight_scale.detach().float()
        zero = getattr(module, "weight_zero_point", None)
        state.layers[name] = (
            scale,
            zero.detach().clone() if zero is not None else torch.zeros_like(scale, dtype=torch.int8),
        )
        for param in ("weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx"):
            if hasattr(module, param):
                delattr(module, param)
        for attr in ("quantization_scheme", "quantization_status"):
            if hasattr(module, attr):
                delattr(module, attr)
    llm.hf_quantizer = None
    if hasattr(llm.config, "quantization_config"):
        del llm.config.quantization_config
    return state


def disk_sizes(out: Path) -> dict[str, Any]:
    """Bytes on disk of a directory, and of its packed layers against the same layers in bfloat16."""
    from safetensors import safe_open

    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    packed = 0
    bf16 = 0
    for path in out.rglob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                if not key.endswith(PACKED_SUFFIXES):
                    continue
                tensor_slice = f.get_slice(key)
                numel = 1
                for dim in tensor_slice.get_shape():
                    numel *= dim
                packed += numel * _DTYPE_BYTES[tensor_slice.get_dtype()]
                if key.endswith(".weight_shape"):
                    rows, cols = f.get_tensor(key).tolist()
                    bf16 += rows * cols * 2
    return {
        "bytes_on_disk": total,
        "quantized_layer_bytes": packed,
        "quantized_layer_bf16_bytes": bf16,
        "quantized_layer_ratio": round(packed / bf16, 4) if bf16 else None,
    }


_DTYPE_BYTES = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "F32": 4, "BF16": 2, "F16": 2}
