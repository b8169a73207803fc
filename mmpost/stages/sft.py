"""Instruction tuning (LLaVA stage 2): multimodal conversations, loss on assistant turns only.

By default the connectors and the LLM train (all LLM weights, or only LoRA adapters when
``model.lora.r`` > 0); add ``encoders`` to ``train.trainable`` to unfreeze the encoders too, with
their own learning rate through ``train.part_lr``.
"""

from __future__ import annotations

from typing import Any

from mmpost.config import RunConfig
from mmpost.data.loader import read_source
from mmpost.model.lmm import LMM
from mmpost.train import fit
from mmpost.training.run import build_model, start_run


class SFT:
    """Train connectors and LLM (or its LoRA adapters) on conversations."""

    def default_trainable(self, model: LMM) -> list[str]:
        return ["connectors", "llm.lora" if model.has_lora else "llm"]

    def run(self, cfg: RunConfig, resume: bool = False, allow_changes: bool = False) -> dict[str, Any]:
        samples = read_source(cfg.data.train, "data.train")  # a bad data file fails before the run directory exists
        ctx = start_run(cfg, resume, allow_changes)
        model = build_model(ctx)
        return fit(ctx, model, cfg.train.trainable or self.default_trainable(model), samples=samples)
