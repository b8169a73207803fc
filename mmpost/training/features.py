"""Filling the feature caches of ``data.cache_features`` before training (``mmpost.data.feature_cache``): each
process encodes its share of the training media the caches lack, once, with the frozen encoder."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from mmpost.data.feature_cache import FeatureCache
from mmpost.data.loader import make_loader, worker_count
from mmpost.data.media import DECODERS
from mmpost.encoders import ENCODERS
from mmpost.interfaces import MediaBatch, MediaProcessor
from mmpost.training.trainable import trains_encoders

log = logging.getLogger("mmpost")


class FillPipeline:
    """For the data loader that fills caches: each sample's media that the caches lack, decoded and preprocessed
    (a medium that cannot be decoded is left out; training skips its sample as it would without a cache)."""

    def __init__(self, processors: dict[str, MediaProcessor], caches: dict[str, FeatureCache]) -> None:
        self.processors, self.caches = processors, caches

    def process(self, sample) -> list[tuple[str, Any, Any]]:
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
def fill(
    caches: dict[str, FeatureCache],
    processors: dict[str, MediaProcessor],
    model,
    loader,
    accelerator,
    batch_size: int,
) -> int:
    """Encodes and writes every medium ``loader`` (of a ``FillPipeline``) yields; returns how many."""
    from tqdm.auto import tqdm

    written = 0
    for media in tqdm(loader, desc="caching features", disable=not accelerator.is_main_process):
        for modality in caches:
            mine = [m for m in media if m[0] == modality]
            for start in range(0, len(mine), batch_size):
                chunk = mine[start : start + batch_size]
                inputs = processors[modality].collate([item for _, _, item in chunk])
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
    cfg, acc = ctx.cfg, ctx.accelerator
    if trains_encoders(parts):
        raise ValueError(
            "data.cache_features: an encoder trains in this stage (train.trainable), so its features change "
            "every step; leave the encoders frozen or unset data.cache_features"
        )
    processors = {m: e.preprocessor() for m, e in model.encoders.items()}
    caches = {}
    for modality, encoder in model.encoders.items():
        processor = processors[modality]
        if processor.reads_text:
            raise ValueError(f"data.cache_features: the {modality} encoder reads its message's text beside the medium")
        name = ENCODERS.name_of(type(encoder))
        caches[modality] = FeatureCache(cfg.data.cache_features, modality, name, encoder, processor)
    fill_pipeline = FillPipeline(processors, caches)
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
    written = fill(caches, processors, model, loader, acc, cfg.eval.batch_size)
    model.train(was_training)
    acc.wait_for_everyone()
    log.info("feature cache: %d media encoded now, the rest read from %s", written, cfg.data.cache_features)
    return caches
