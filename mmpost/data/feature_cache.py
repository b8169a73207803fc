"""Features of frozen encoders computed once and read from disk (``data.cache_features: DIR``).

A frozen encoder gives the same features for the same medium every epoch (align, and sft with a frozen tower), so
running it again is wasted work. Before training, every medium of the training data that the cache lacks is
decoded, preprocessed and encoded once (each process takes its share) and written as one ``.npy`` file; training
then reads those files memory-mapped in the data workers instead of decoding the medium, and the encoder does not
run (``mmpost.training.features`` fills the caches). No library caches features of an arbitrary encoder keyed
this way, hence this module.

Keys: a cache lives in ``DIR/<modality>/<fingerprint>/``, the fingerprint hashing the encoder's registry name,
its spec, every weight and buffer, and the preprocessing's settings, so another encoder, other weights or another
preprocessing get another folder (and later runs with the same encoder reuse it). Within it, a medium's file is
named by the hash of its file's path, size and modification time (or of its bytes, for shard members). Each file
holds the medium's real feature vectors ``[N, D]`` and the input shape its tokens are counted from.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmpost.interfaces import CACHED, CACHED_MASK, Encoder, MediaBatch, MediaProcessor


@dataclass
class CachedMedium:
    """A medium's cached features (``[N, D]``, a memory-mapped array) and the shape of its preprocessed input,
    which counts its tokens as the input itself would (``shape``)."""

    features: np.ndarray
    input_shape: tuple[int, ...]

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.input_shape)


def fingerprint(name: str, encoder: Encoder, processor: MediaProcessor) -> str:
    """A hash of everything that decides an encoder's features: its name, spec, tensors and preprocessing."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"name": name, "spec": encoder.spec()}, sort_keys=True, default=str).encode())
    for key, tensor in sorted(encoder.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    settings = {k: v for k, v in vars(processor).items() if not k.startswith("_")}
    digest.update(json.dumps(settings, sort_keys=True, default=_describe).encode())
    return digest.hexdigest()[:24]


def _describe(value: Any) -> Any:
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    if hasattr(value, "__dict__"):
        return {k: v for k, v in vars(value).items() if not k.startswith("_")}
    return repr(value)


def medium_key(ref: Path | bytes | str) -> str:
    """The name of a medium's file: its path, size and modification time, or its bytes, hashed."""
    if isinstance(ref, bytes):
        return hashlib.sha256(ref).hexdigest()[:32]
    path = Path(ref).resolve()
    stat = path.stat()
    return hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:32]


class FeatureCache:
    """One modality's cache folder for one encoder and preprocessing.

    Args:
        root: ``data.cache_features``.
        modality: the medium (``image``, ``audio``).
        name: the encoder's registry name.
        encoder, processor: the frozen encoder and its media processor.
    """

    def __init__(self, root: str | Path, modality: str, name: str, encoder: Encoder, processor: MediaProcessor):
        self.dir = Path(root) / modality / fingerprint(name, encoder, processor)
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, ref: Path | bytes | str) -> Path:
        return self.dir / f"{medium_key(ref)}.npy"

    def get(self, ref: Path | bytes | str) -> CachedMedium | None:
        """The cached medium, memory-mapped, or None when the cache lacks it."""
        path = self.path(ref)
        if not path.is_file():
            return None
        shape = json.loads(path.with_suffix(".json").read_text())["input_shape"]
        return CachedMedium(np.load(path, mmap_mode="r"), tuple(shape))

    def put(self, ref: Path | bytes | str, features: torch.Tensor, input_shape: Sequence[int]) -> None:
        """Writes a medium's ``[N, D]`` real features atomically (a reader sees the whole file or none)."""
        path = self.path(ref)
        path.with_suffix(".json").write_text(json.dumps({"input_shape": list(input_shape)}))
        scratch = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(scratch, features.detach().float().cpu().numpy())
        os.replace(scratch, path)


class CachingProcessor(MediaProcessor):
    """An encoder's media processor that also collates cached media: a batch of them becomes the padded features
    ``{CACHED: [B, N, D], CACHED_MASK: [B, N]}`` that ``LMM.features`` hands to the connector unencoded."""

    def __init__(self, inner: MediaProcessor, cache: FeatureCache) -> None:
        self.inner, self.cache = inner, cache

    def __call__(self, raw: Any) -> torch.Tensor:
        return self.inner(raw)

    def collate(self, items: Sequence[Any]) -> MediaBatch:
        cached = [isinstance(item, CachedMedium) for item in items]
        if not any(cached):
            return self.inner.collate(items)
        if not all(cached):
            raise RuntimeError(f"feature cache {self.cache.dir} lacks media of this batch, filled before training")
        return collate_cached(items)


def collate_cached(items: Sequence[CachedMedium]) -> dict[str, torch.Tensor]:
    width = max(item.features.shape[0] for item in items)
    features = torch.zeros(len(items), width, items[0].features.shape[1])
    mask = torch.zeros(len(items), width, dtype=torch.bool)
    for i, item in enumerate(items):
        features[i, : item.features.shape[0]] = torch.from_numpy(np.array(item.features))  # copies off the map
        mask[i, : item.features.shape[0]] = True
    return {CACHED: features, CACHED_MASK: mask}
