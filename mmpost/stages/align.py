"""Connector alignment (LLaVA stage 1, BLIP-2 stage 2 without the Q-Former's first stage).

Captions; the connectors train while the encoders and the LLM stay frozen, so the LLM learns
nothing and only the mapping from media features into its embedding space is fitted. The loss is
the summed next-token cross-entropy on caption tokens divided by the caption tokens of the step.
"""

from __future__ import annotations

from typing import Any

from mmpost.config import RunConfig
from mmpost.data.loader import read_source
from mmpost.model.lmm import LMM
from mmpost.train import fit
from mmpost.training.run import build_model, start_run


class Align:
    """Train connectors on captions, with encoders and LLM frozen (``train.trainable: [connectors]``)."""

    def default_trainable(self, model: LMM) -> list[str]:
        return ["connectors"]

    def run(self, cfg: RunConfig, resume: bool = False, allow_changes: bool = False) -> dict[str, Any]:
        samples = read_source(cfg.data.train, "data.train")  # a bad data file fails before the run directory exists
        ctx = start_run(cfg, resume, allow_changes)
        model = build_model(ctx)
        return fit(ctx, model, cfg.train.trainable or self.default_trainable(model), samples=samples)
