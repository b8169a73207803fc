"""Features of frozen encoders computed once and read from disk (``data.cache_features: DIR``).

A frozen encoder gives the same features for the same medium every epoch (align, and sft with a frozen tower), so
running it again is wasted work. Before training, every medium of the training data that the cache lacks is
decoded, preprocessed and encoded once (each process takes its share) and written as one ``.npy`` file; training
then reads those files memory-mapped in the data workers instead of decoding the medium, and the encoder does not
run. No library caches features of an arbitrary encoder keyed this way, hence this module.

Keys: a cache lives in ``DIR/<modality>/<fingerprint>/``, the fingerprint hashing the encoder's registry name, its
spec, every weight and buffer, and the preprocessing's settings, so another encoder, other weights or another
preprocessing get another folder (and later runs with the same encoder reuse it). Within it, a medium's file is
named by the hash of its file's path, size and modification time (or of its bytes, for shard members). Each file
holds the medium's real feature vectors ``[N, D]`` and the input shape its tokens are counted from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmpost.interfaces import Encoder, EncoderOutput, MediaBatch, MediaProcessor

log = logging.getLogger("mmpost")

CACHED = "cached_features"
CACHED_MASK = "cached_mask"


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


def cached_output(inputs: MediaBatch) -> EncoderOutput | None:
    """The encoder output a batch of cached media stands for, or None for a batch of encoder inputs."""
    if not (isinstance(inputs, dict) and CACHED in inputs):
        return None
    mask = inputs[CACHED_MASK]
    return EncoderOutput(inputs[CACHED], None if bool(mask.all()) else mask)


class FillPipeline:
    """For the data loader that fills caches: each sample's media that the caches lack, decoded and preprocessed
    (a medium that cannot be decoded is left out; training skips its sample as it would without a cache)."""

    def __init__(self, processors: dict[str, MediaProcessor], caches: dict[str, FeatureCache]) -> None:
        self.processors, self.caches = processors, caches

    def process(self, sample) -> list[tuple[str, Any, Any]]:
        from mmpost.data.media import DECODERS

        missing = []
        for modality, refs in sample.media.items():
            cache = self.caches.get(modality)
            for ref in refs if cache is not None else ():
                if cache.path(ref).is_file():
                    continue
                try:
                    raw = DECODERS[modality](ref)
                except Exception:  # unusable bytes: training skips and counts the sample
                    continue
                missing.append((modality, ref, self.processors[modality](raw)))
        return missing

    def collate(self, samples: Sequence[list[tuple[str, Any, Any]]]) -> list[tuple[str, Any, Any]]:
        return [medium for sample in samples for medium in sample]


@torch.no_grad()
def fill(caches: dict[str, FeatureCache], model, loader, accelerator, batch_size: int) -> int:
    """Encodes and writes every medium ``loader`` (of a ``FillPipeline``) yields; returns how many."""
    from tqdm.auto import tqdm

    written = 0
    for media in tqdm(loader, desc="caching features", disable=not accelerator.is_main_process):
        for modality in caches:
            mine = [m for m in media if m[0] == modality]
            for start in range(0, len(mine), batch_size):
                chunk = mine[start : start + batch_size]
                inputs = model.encoders[modality].preprocessor().collate([item for _, _, item in chunk])
                with accelerator.autocast():
                    out = model.features(modality, send(inputs, accelerator.device))
                for i, (_, ref, item) in enumerate(chunk):
                    real = out.features[i] if out.mask is None else out.features[i][out.mask[i]]
                    caches[modality].put(ref, real, tuple(item.shape))
                written += len(chunk)
    return written


def send(inputs: MediaBatch, device) -> MediaBatch:
    if isinstance(inputs, dict):
        return {k: v.to(device) for k, v in inputs.items()}
    return inputs.to(device)


def feature_caches(ctx, model, parts: Sequence[str], samples) -> dict[str, FeatureCache]:
    """The caches of ``data.cache_features`` for ``model``'s encoders, filled for the training data.

    Raises:
        ValueError: when an encoder trains in this stage (``parts``) or reads text beside its media.
    """
    from mmpost.data.loader import make_loader, worker_count
    from mmpost.encoders import ENCODERS
    from mmpost.training.trainable import trains_encoders

    cfg, acc = ctx.cfg, ctx.accelerator
    caches = {}
    for modality, encoder in model.encoders.items():
        processor = encoder.preprocessor()
        if trains_encoders(parts):
            raise ValueError(
                "data.cache_features: an encoder trains in this stage (train.trainable), so its features change "
                "every step; leave the encoders frozen or unset data.cache_features"
            )
        if processor.reads_text:
            raise ValueError(f"data.cache_features: the {modality} encoder reads its message's text beside the medium")
        name = ENCODERS.name_of(type(encoder))
        caches[modality] = FeatureCache(cfg.data.cache_features, modality, name, encoder, processor)
    fill_pipeline = FillPipeline({m: e.preprocessor() for m, e in model.encoders.items()}, caches)
    loader, _ = make_loader(
        samples,
        fill_pipeline,
        batch_size=cfg.eval.batch_size,
        shards=cfg.data.train.path,
        rank=acc.process_index,
        world=acc.num_processes,
        num_workers=worker_count(cfg.data.num_workers, acc.device),
    )
    model.to(acc.device)
    was_training = model.training
    model.eval()
    written = fill(caches, model, loader, acc, cfg.eval.batch_size)
    model.train(was_training)
    acc.wait_for_everyone()
    log.info("feature cache: %d media encoded now, the rest read from %s", written, cfg.data.cache_features)
    return caches
