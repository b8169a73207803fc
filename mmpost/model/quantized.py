"""How mmpost holds a compressed LLM: float weights equal to what a serving engine computes with, plus what is
needed to write them back in the compressed-tensors format (``mmpost.model.compressed``).

A quantized layer's float weight is its dequantized integers (or FP8 values) and ``QuantState`` keeps each layer's
scale and zero point; packing that weight with those scales gives back the integers exactly. A pruned layer's
weight holds its zeros. Schemes that quantize activations (W8A8, FP8) or the KV cache also change what the model
computes at run time: ``install_runtime`` hooks the LLM so that its forward quantizes the inputs of each quantized
layer per token and the keys and values with their calibrated scales, with compressed-tensors' own arithmetic, as
transformers and vLLM do with the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

SPARSITY_STRUCTURES = ("2:4", "unstructured")


@dataclass(frozen=True)
class WeightScheme:
    """How a weight is quantized.

    Attributes:
        bits: 4 or 8 for integers; 8 for floats.
        symmetric: integers around zero (one scale per group); false adds a zero point. Floats are symmetric.
        group_size: input columns that share one scale; None gives one scale per output row.
        type: int, or float for FP8 (E4M3, the format vLLM serves as "fp8").
    """

    bits: int = 4
    symmetric: bool = True
    group_size: int | None = 64
    type: Literal["int", "float"] = "int"

    def __post_init__(self) -> None:
        if self.type not in ("int", "float"):
            raise ValueError(f"weight type must be int or float, got {self.type!r}")
        if self.type == "float" and (self.bits != 8 or not self.symmetric):
            raise ValueError("float weights are FP8 (E4M3): bits 8, symmetric")
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be a positive integer or null (per-channel), got {self.group_size}")

    def args(self):
        """The compressed-tensors ``QuantizationArgs`` of this scheme, as written into the checkpoint's config."""
        from compressed_tensors.quantization import QuantizationArgs

        common = {"num_bits": self.bits, "type": self.type, "symmetric": self.symmetric}
        if self.group_size is None:
            return QuantizationArgs(**common, strategy="channel")
        return QuantizationArgs(**common, strategy="group", group_size=self.group_size)

    def describe(self) -> str:
        """Short label for logs and reports, e.g. ``int4 sym g64``, ``int8 asym per-channel``, ``fp8 per-channel``."""
        layout = "per-channel" if self.group_size is None else f"g{self.group_size}"
        if self.type == "float":
            return f"fp8 {layout}"
        return f"int{self.bits} {'sym' if self.symmetric else 'asym'} {layout}"


@dataclass(frozen=True)
class ActivationScheme:
    """Inputs of the quantized layers quantized at run time, one scale per token from its own absolute maximum
    (dynamic, symmetric, 8 bits): int8 for W8A8, FP8 for W8A8-FP8."""

    type: Literal["int", "float"] = "int"

    def args(self):
        from compressed_tensors.quantization import QuantizationArgs

        return QuantizationArgs(num_bits=8, type=self.type, symmetric=True, strategy="token", dynamic=True)

    def describe(self) -> str:
        return f"{'int8' if self.type == 'int' else 'fp8'} dynamic per-token activations"


def kv_cache_args():
    """FP8 keys and values with one static scale per attention layer, what vLLM's ``kv_cache_dtype=fp8`` reads."""
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="tensor", dynamic=False)


@dataclass
class QuantState:
    """A model's compressed layers: its float weights are the dequantized (and pruned) weights of these layers.

    Attributes:
        scheme: the weights' quantization, the same for every quantized layer; None when the layers are only
            pruned.
        ignore: regular expressions of layers kept in float and dense (``QuantizeOptions.ignore``).
        layers: per LLM module name (``model.layers.0.mlp.down_proj``), its ``(scale, zero_point)``.
        method: how the weights were chosen (rtn, gptq, awq; with smoothquant, sparsegpt or wanda), for reports.
        activations: the run-time quantization of the quantized layers' inputs; None for weight-only schemes.
        sparsity: "2:4" or "unstructured" when the layers are pruned, with ``sparse_layers`` naming them and
            ``sparsity_ratio`` the fraction of zero weights over them.
        kv_scales: per attention module name (``model.layers.0.self_attn``), its FP8 key and value scales; empty
            without a quantized KV cache.
        runtime: the hooks ``install_runtime`` put on the LLM for this state.
    """

    scheme: WeightScheme | None
    ignore: list[str]
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    method: str = "rtn"
    activations: ActivationScheme | None = None
    sparsity: str | None = None
    sparse_layers: list[str] = field(default_factory=list)
    sparsity_ratio: float = 0.0
    kv_scales: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    runtime: Any = field(default=None, repr=False, compare=False)

    def describe(self) -> str:
        parts = [self.scheme.describe()] if self.scheme else []
        if self.activations:
            parts.append(self.activations.describe())
        if self.sparsity:
            parts.append(f"{self.sparsity} sparse")
        if self.kv_scales:
            parts.append("fp8 kv cache")
        count = len(self.layers) or len(self.sparse_layers)
        return f"{', '.join(parts)} ({self.method}, {count} layers)"

    def reinstall(self, llm: nn.Module, kv: bool = True) -> None:
        """Replaces the run-time hooks on ``llm``, with (``kv``) or without the KV-cache quantization."""
        if self.runtime is not None:
            self.runtime.remove()
        self.runtime = install_runtime(llm, self, kv=kv)

    @property
    def names(self) -> list[str]:
        """Every layer the state changed, quantized or pruned."""
        return sorted(set(self.layers) | set(self.sparse_layers))


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


def attention_modules(llm: nn.Module) -> dict[str, nn.Module]:
    """The LLM's attention modules whose keys and values a KV cache holds: those with a ``k_proj`` and a
    ``v_proj`` and a cache argument."""
    import inspect

    out = {}
    for name, module in llm.named_modules():
        if hasattr(module, "k_proj") and hasattr(module, "v_proj") and "attention" in type(module).__name__.lower():
            parameters = inspect.signature(module.forward).parameters
            if any(n in parameters for n in ("cache", "past_key_values", "past_key_value")):
                out[name] = module
    return out


class KVStandIn:
    """Takes the place of an attention module's cache argument for one call: keys and values (after rotary
    embedding) go through ``transform`` before the real cache, if any, stores them; with no real cache they are
    returned, which is what the attention then uses. Quantizing here is what an FP8 KV cache does: the stored keys
    and values are FP8, the queries are not."""

    def __init__(self, transform: Callable, real: Any = None) -> None:
        self.transform, self.real = transform, real

    def update(self, key: torch.Tensor, value: torch.Tensor, *args, **kwargs):
        key, value = self.transform(key, value)
        if self.real is not None:
            return self.real.update(key, value, *args, **kwargs)
        return key, value

    def __getattr__(self, name: str):
        return getattr(self.__dict__["real"], name)


def hook_kv(module: nn.Module, transform: Callable):
    """Routes ``module``'s keys and values through ``transform(key, value) -> (key, value)`` on every forward."""
    import inspect

    parameters = inspect.signature(module.forward).parameters
    arg = next((n for n in ("cache", "past_key_values", "past_key_value") if n in parameters), None)
    if arg is None:
        raise ValueError(f"{type(module).__name__}: its forward takes no cache argument to quantize keys and values in")

    def stand_in(_module: nn.Module, args: tuple, kwargs: dict):
        kwargs[arg] = KVStandIn(transform, kwargs.get(arg))
        return args, kwargs

    return module.register_forward_pre_hook(stand_in, with_kwargs=True)


class Runtime:
    """The hooks one ``install_runtime`` call added, so that they can be taken off again."""

    def __init__(self) -> None:
        self.handles: list = []

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def install_runtime(llm: nn.Module, state: QuantState, kv: bool = True) -> Runtime:
    """Makes ``llm`` compute as a serving engine does with ``state``'s checkpoint: the inputs of each quantized
    layer quantized per token (W8A8, FP8), and keys and values, after rotary embedding, quantized with their
    FP8 scales. Weight-only and pruned layers need nothing: their weights already are what the engine uses.

    The arithmetic is compressed-tensors' (``forward_quantize``, ``fake_quantize``), the code transformers runs on a
    reload for the activations (transformers 5 does not quantize the KV cache of a reload; vLLM does). ``kv``
    false leaves the KV cache in float, to compare with such a reload.
    """
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    runtime = Runtime()
    if state.activations is not None:
        args = state.activations.args()

        def quantize_input(module: nn.Module, inputs: tuple):
            return (quantize_dynamic(module, inputs[0], args), *inputs[1:])

        for name in state.layers:
            runtime.handles.append(llm.get_submodule(name).register_forward_pre_hook(quantize_input))
    kv_args = kv_cache_args()
    for name, (k_scale, v_scale) in (state.kv_scales if kv else {}).items():

        def fp8_kv(key, value, k_scale=k_scale, v_scale=v_scale):
            k, v = k_scale.to(key.device), v_scale.to(value.device)
            return fake_quantize(key, k, None, kv_args), fake_quantize(value, v, None, kv_args)

        runtime.handles.append(hook_kv(llm.get_submodule(name), fp8_kv))
    return runtime


def quantize_dynamic(module: nn.Module, value: torch.Tensor, args) -> torch.Tensor:
    """``value``, an input of ``module``, quantized per token as compressed-tensors' quantized forward does (it
    reads the module's status)."""
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    status = getattr(module, "quantization_status", None)
    if status is None:  # forward_quantize reads it to skip weights only; a plain module has none
        module.quantization_status = QuantizationStatus.FROZEN
    try:
        return forward_quantize(module, value, "input", args)
    finally:
        if status is None:
            del module.quantization_status
