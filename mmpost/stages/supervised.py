"""What the conversation stages (align, sft) share: the next-token loss on assistant tokens, and their run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmpost.config import RunConfig
from mmpost.data.batches import ConversationBatch
from mmpost.data.loader import read_source
from mmpost.data.pipeline import ConversationPipeline
from mmpost.training.context import build_model, start_run
from mmpost.training.evaluate import Evaluator
from mmpost.training.features import feature_caches
from mmpost.training.loop import start_training, train, training_loader
from mmpost.training.step import BatchLoss, supervised_step
from mmpost.training.trainable import resolve_parts


class ConversationLoss:
    """Summed next-token cross-entropy on the assistant tokens of a batch, normalised by its label tokens."""

    def units(self, batch: ConversationBatch) -> int:
        return batch.label_tokens()

    def __call__(self, model: torch.nn.Module, batch: ConversationBatch) -> BatchLoss:
        out = model(
            batch.input_ids,
            batch.attention_mask,
            batch.media,
            labels=batch.labels,
            segments=batch.segments,
            cross_entropy=True,
        )
        return BatchLoss(out.cross_entropy, out.targets.numel())


def train_on_conversations(cfg: RunConfig, resume: bool, allow_changes: bool, default: Sequence[str]) -> dict[str, Any]:
    """Trains ``train.trainable`` (or ``default``) on ``data.train``'s conversations; returns the run summary."""
    samples = read_source(cfg.data.train, "data.train")  # a bad data file fails before the run directory exists
    ctx = start_run(cfg, resume, allow_changes)
    model = build_model(ctx)
    parts = resolve_parts(cfg.train.trainable, default, model)
    caches = feature_caches(ctx, model, parts, samples) if cfg.data.cache_features else None
    pipeline = ConversationPipeline.for_model(model, cfg.data.max_length, caches, packing=cfg.data.packing)
    loader = training_loader(ctx, samples, pipeline)
    training = start_training(ctx, model, parts, loader, Evaluator(ctx, model))
    return train(training, supervised_step(ConversationLoss()))
