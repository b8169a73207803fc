"""Position ids of the decoder: 0, 1, 2, ... over each row's real tokens, or a model's own scheme (Qwen2-VL's
M-RoPE, ``mmpost.families.mrope``) registered in ``mmpost.registry.POSITIONS``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch

from mmpost.interfaces import MediaBatch


def positions_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left- or right-padded batch: 0 at each sample's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class PositionScheme(Protocol):
    """Position ids a decoder needs that are not 0, 1, 2, ... over each row's tokens (Qwen2-VL's M-RoPE)."""

    def position_ids(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        media: Mapping[str, MediaBatch],
        media_repeat: int = 1,
    ) -> torch.Tensor:
        """The ids the decoder takes for the batch (for M-RoPE ``[3, B, T]``); ``media_repeat`` as in ``embed``.

        ``generate`` hands the prompt's ids to transformers, which continues every id row by one per new token.
        """

    def spec(self) -> dict[str, Any]:
        """``{"name": ..., **options}``, saved in ``mmpost.json`` (``mmpost.registry.POSITIONS``)."""
