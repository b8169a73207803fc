"""Connector alignment (LLaVA stage 1, BLIP-2 stage 2 without the Q-Former's first stage).

Captions; the connectors train while the encoders and the LLM stay frozen, so the LLM learns
nothing and only the mapping from media features into its embedding space is fitted. The loss is
the summed next-token cross-entropy on caption tokens divided by the caption tokens of the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from mmpost.config import RunConfig
from mmpost.stages.supervised import train_on_conversations


@dataclass
class AlignOptions:
    """``stage: align`` has no options of its own."""

    name: Literal["align"] = "align"


class Align:
    """Train connectors on captions, with encoders and LLM frozen (``train.trainable: [connectors]``)."""

    Options = AlignOptions
    trains = ("connectors",)

    def __init__(self, options: AlignOptions) -> None:
        self.options = options

    def run(self, cfg: RunConfig, resume: bool = False, allow_changes: bool = False) -> dict[str, Any]:
        return train_on_conversations(cfg, resume, allow_changes, self.trains)
