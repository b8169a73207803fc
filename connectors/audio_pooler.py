"""Qwen2-Audio's head on its audio tower: average-pool consecutive features, LayerNorm, then one Linear map to
the LLM's width.

In transformers the pooling and the layer norm end ``Qwen2AudioEncoder`` and the Linear is
``Qwen2AudioMultiModalProjector``; here the three are one connector after the ``qwen2_audio`` encoder, so a
checkpoint's tensors load under their own shapes and the tokens are the released model's. A clip of ``n``
real features gives ``(n - pool) // pool + 1`` (that is ``n // pool``) tokens, transformers'
``(n - 2) // 2 + 1`` for the released pool of 2; each real token averages real features only, so padded
features never reach the LLM.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmpost.interfaces import Connector


class AudioPoolerConnector(Connector):
    """``pool`` consecutive features averaged into one token, normalised and projected.

    A feature mask marks each medium's first ``n`` features real (the audio encoders' padding is at the end), so
    a medium's first ``n // pool`` tokens are its real ones.

    Args:
        pool: features per token (the kernel and stride of the average pooling; Qwen2-Audio: 2).

    Raises:
        ValueError: on a ``pool`` below 1.
    """

    def __init__(self, pool: int = 2) -> None:
        super().__init__()
        if pool < 1:
            raise ValueError(f"audio_pooler: pool must be >= 1, got {pool}")
        self.pool = pool

    def _build(self, in_dim: int, out_dim: int) -> None:
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        pooled = F.avg_pool1d(features.transpose(1, 2), self.pool, self.pool).transpose(1, 2)  # [B, N // pool, D]
        return self.proj(self.norm(pooled))

    def num_tokens(self, num_features: int) -> int:
        return num_features // self.pool

    def token_mask(self, feature_mask: torch.Tensor | None) -> torch.Tensor | None:
        if feature_mask is None:
            return None
        counts = feature_mask.sum(-1) // self.pool  # [B]
        tokens = feature_mask.shape[1] // self.pool
        return torch.arange(tokens, device=feature_mask.device)[None, :] < counts[:, None]  # [B, M]

    def spec(self) -> dict[str, Any]:
        return {"pool": self.pool}
