"""The compressed-tensors checkpoint format: writing a compressed LLM, and reading one back into mmpost.

compressed-tensors packs the integers (eight int4 or four int8 per int32 for weight-only schemes, int8 and FP8
tensors for W8A8 and FP8) and writes the ``quantization_config`` that transformers
(``CompressedTensorsHfQuantizer``) and vLLM read. Writing the weights with the scales of ``QuantState`` gives back
its integers exactly, so a checkpoint reloads to the same float weights.

Two parts of the config are written here rather than by compressed-tensors 0.20: its ``sparsity_config`` (the
library writes an empty one, "sparsity is removed for now"), recorded with format ``dense`` since the pruned
weights are stored as they are, zeros included; and ``kv_cache_scheme`` with each attention layer's ``k_scale`` and
``v_scale``, because compressed-tensors finds attention modules by a ``past_key_values`` argument that
transformers 5's attention no longer has (it is ``cache``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmpost.model.quantized import (
    ActivationScheme,
    QuantState,
    WeightScheme,
    ignore_patterns,
    install_runtime,
    kv_cache_args,
    selected_linears,
)

PACKED_SUFFIXES = (".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_shape", ".weight_g_idx")
KV_FILE = "kv_cache_scales.safetensors"


def checkpoint_format(state: QuantState) -> str:
    """The compressed-tensors format of ``state``'s weights: packed integers for weight-only schemes, int8 or FP8
    tensors when the activations are quantized too (what vLLM's W8A8 and FP8 kernels read), dense when only
    pruned."""
    if state.scheme is None:
        return "dense"
    if state.scheme.type == "float":
        return "float-quantized"
    return "int-quantized" if state.activations is not None else "pack-quantized"


def save_compressed(
    hf_model: nn.Module,
    out: Path,
    state: QuantState,
    rename: Callable[[str], str] = lambda name: name,
    extra_ignore: Iterable[str] = (),
) -> None:
    """Writes ``hf_model``, which holds the compressed float weights, with ``save_pretrained`` plus its config.

    ``hf_model`` is a fresh transformers model (it is changed: its layers are replaced by packed ones).
    ``rename`` maps mmpost's LLM module names to ``hf_model``'s; the ``extra_ignore`` patterns keep its other parts
    (vision tower, projector) in float.

    Raises:
        ValueError: if the layers compressed-tensors would quantize differ from the quantized ones.
    """
    ignore = ignore_patterns(state.ignore, extra_ignore)
    if state.scheme is None:
        hf_model.save_pretrained(out)
        config = {"quant_method": "compressed-tensors", "format": "dense", "config_groups": {}, "ignore": ignore}
    else:
        _write_quantized(hf_model, out, state, rename, ignore)
        config = json.loads((out / "config.json").read_text())["quantization_config"]
    if state.sparsity:
        config["sparsity_config"] = {
            "format": "dense",
            "targets": ["Linear"],
            "ignore": ignore,
            "global_sparsity": round(state.sparsity_ratio, 4),
            "sparsity_structure": state.sparsity,
        }
    if state.kv_scales:
        config["kv_cache_scheme"] = kv_cache_args().model_dump()
        scales = {}
        for name, (k_scale, v_scale) in state.kv_scales.items():
            scales[f"{rename(name)}.k_scale"] = k_scale.float().reshape(1).contiguous()
            scales[f"{rename(name)}.v_scale"] = v_scale.float().reshape(1).contiguous()
        _add_tensors(out, scales)
    _set_quantization_config(out, config)


def _write_quantized(hf_model: nn.Module, out: Path, state: QuantState, rename, ignore: list[str]) -> None:
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )

    activations = state.activations.args() if state.activations else None
    config = QuantizationConfig(
        config_groups={
            "group_0": QuantizationScheme(
                targets=["Linear"], weights=state.scheme.args(), input_activations=activations
            )
        },
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
    compressor = ModelCompressor.from_pretrained_model(hf_model, quantization_format=checkpoint_format(state))
    compressor.compress_model(hf_model)
    hf_model.save_pretrained(out)
    # The ignore list compressed-tensors derives uses checkpoint key names, which differ from module
    # names at load time for composite models (LLaVA); ours matches both.
    compressor.quantization_config.ignore = ignore
    compressor.update_config(str(out))


def _set_quantization_config(out: Path, config: dict[str, Any]) -> None:
    path = out / "config.json"
    data = json.loads(path.read_text())
    data["quantization_config"] = config
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def _add_tensors(out: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Adds ``tensors`` to the checkpoint as a file of their own, listed in the weight index (written for a
    single-file checkpoint), so that loaders that read the index find them."""
    save_file(tensors, str(out / KV_FILE), metadata={"format": "pt"})
    index_path = out / "model.safetensors.index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
    else:
        weights = load_file(str(out / "model.safetensors"))
        index = {"metadata": {}, "weight_map": dict.fromkeys(weights, "model.safetensors")}
    index["weight_map"] |= dict.fromkeys(tensors, KV_FILE)
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True))


def read_kv_scales(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The KV-cache scales a checkpoint written by ``save_compressed`` carries, per attention module name."""
    file = Path(path) / KV_FILE
    if not file.is_file():
        return {}
    tensors = load_file(str(file))
    names = sorted({key.rsplit(".", 1)[0] for key in tensors})
    return {name: (tensors[f"{name}.k_scale"], tensors[f"{name}.v_scale"]) for name in names}


def adopt_loaded(llm: nn.Module, path: Path | None = None) -> QuantState | None:
    """Turns a transformers model loaded from a compressed-tensors checkpoint into mmpost's form.

    Its layers get their dequantized weights and lose the quantization parameters; the scales and zero points
    move into the returned ``QuantState`` (None when ``llm`` is not compressed), whose run-time quantization
    (activations, KV cache) is installed on ``llm``. Afterwards the model runs through any of its submodules (the
    decompression hook transformers installs fires only on the top-level forward). ``path``, the checkpoint's
    folder, gives the KV-cache scales.
    """
    config = getattr(llm.config, "quantization_config", None)
    quantizer = getattr(llm, "hf_quantizer", None)
    if config is None:
        return None
    config = config if isinstance(config, dict) else config.to_dict()
    if path is not None and (Path(path) / "config.json").is_file():  # as written: transformers drops sparsity_config
        config = json.loads((Path(path) / "config.json").read_text()).get("quantization_config", config)
    sparsity = config.get("sparsity_config") or {}
    groups = config.get("config_groups") or {}
    scheme = activations = None
    if groups:
        if quantizer is None or getattr(quantizer, "compressor", None) is None:
            return None
        quantizer.compressor.decompress_model(llm)
        group = next(iter(quantizer.compressor.quantization_config.config_groups.values()))
        w = group.weights
        scheme = WeightScheme(bits=w.num_bits, symmetric=w.symmetric, group_size=w.group_size, type=w.type)
        if group.input_activations is not None:
            activations = ActivationScheme(type=group.input_activations.type)
    ignore = [p.removeprefix("re:.*") for p in config.get("ignore") or [] if p.startswith("re:.*")]
    state = QuantState(scheme=scheme, ignore=ignore, method="loaded", activations=activations)
    for name, module in llm.named_modules():
        if not hasattr(module, "quantization_scheme"):
            continue
        if hasattr(module, "weight_scale"):
            scale = module.weight_scale.detach().float()
            zero = getattr(module, "weight_zero_point", None)
            state.layers[name] = (
                scale,
                zero.detach().clone() if zero is not None else torch.zeros_like(scale, dtype=torch.int8),
            )
        for param in ("weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx", "input_scale"):
            if hasattr(module, param):
                delattr(module, param)
        for attr in ("quantization_scheme", "quantization_status"):
            if hasattr(module, attr):
                delattr(module, attr)
    if sparsity.get("sparsity_structure"):
        state.sparsity = sparsity["sparsity_structure"]
        state.sparsity_ratio = float(sparsity.get("global_sparsity") or 0.0)
        state.sparse_layers = sorted(selected_linears(llm, ignore))
    if path is not None:
        state.kv_scales = read_kv_scales(path)
    llm.hf_quantizer = None
    if hasattr(llm.config, "quantization_config"):
        del llm.config.quantization_config
    state.runtime = install_runtime(llm, state)
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
                if not key.endswith(PACKED_SUFFIXES) and not _is_compressed_weight(f, key):
                    continue
                tensor_slice = f.get_slice(key)
                shape = tensor_slice.get_shape()
                numel = 1
                for dim in shape:
                    numel *= dim
                packed += numel * _DTYPE_BYTES[tensor_slice.get_dtype()]
                if key.endswith(".weight_shape"):
                    rows, cols = f.get_tensor(key).tolist()
                    bf16 += rows * cols * 2
                elif key.endswith(".weight"):  # int8 / fp8 weights are stored unpacked, one byte each
                    bf16 += numel * 2
    return {
        "bytes_on_disk": total,
        "quantized_layer_bytes": packed,
        "quantized_layer_bf16_bytes": bf16,
        "quantized_layer_ratio": round(packed / bf16, 4) if bf16 else None,
    }


def _is_compressed_weight(f, key: str) -> bool:
    """An int8 / FP8 weight (W8A8, FP8 checkpoints), which has a ``weight_scale`` beside it."""
    return key.endswith(".weight") and f.get_slice(key).get_dtype() in ("I8", "F8_E4M3")


_DTYPE_BYTES = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1}
