"""Instruction tuning (LLaVA stage 2): multimodal conversations, loss on assistant turns only.

By default the connectors and the LLM train (all LLM weights, or only LoRA adapters when
``model.lora.r`` > 0); add ``encoders`` to ``train.trainable`` to unfreeze the encoders too, with
their own learning rate through ``train.part_lr``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from mmpost.config import RunConfig
from mmpost.stages.supervised import train_on_conversations


@dataclass
class SFTOptions:
    """``stage: sft`` has no options of its own."""

    name: Literal["sft"] = "sft"


class SFT:
    """Train connectors and LLM (or its LoRA adapters) on conversations."""

    Options = SFTOptions
    trains = ("connectors", "llm")  # llm: the LoRA adapters when the model has them

    def __init__(self, options: SFTOptions) -> None:
        self.options = options

    def run(self, cfg: RunConfig, resume: bool = False, allow_changes: bool = False) -> dict[str, Any]:
        return train_on_conversations(cfg, resume, allow_changes, self.trains)
