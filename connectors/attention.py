"""Attention and feed-forward blocks shared by the resampler and the cross-attention connectors.

Written here rather than taken from a model library because the perceiver resampler and Flamingo's
gated cross-attention are not importable as standalone modules from transformers, timm or open_clip
(each model defines its own private copy tied to its config). Attention itself is PyTorch's
``scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def check_heads(owner: str, width: int, heads: int, what: str) -> None:
    """Raises ValueError naming both numbers when ``heads`` does not divide ``width``."""
    if heads < 1 or width % heads:
        raise ValueError(f"{owner}: {heads} attention heads do not divide the {what} width {width}")


class CrossAttention(nn.Module):
    """Multi-head attention from queries of width ``dim`` to keys / values of width ``kv_dim``.

    Args:
        dim: query (and output) width.
        kv_dim: key / value input width.
        heads: number of heads; each has width ``dim // heads``.
    """

    def __init__(self, dim: int, kv_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(kv_dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, T, dim]`` attends to ``kv [B, S, kv_dim]``; ``allowed [B, T, S]`` or ``[B, 1, S]`` bool.

        Every row of ``allowed`` must keep at least one key.
        """
        b, t, _ = x.shape
        q = self.to_q(x).view(b, t, self.heads, -1).transpose(1, 2)  # [B, H, T, d]
        k, v = self.to_kv(kv).view(b, kv.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)  # [B, H, S, d] each
        mask = None if allowed is None else allowed.unsqueeze(1)  # [B, 1, T|1, S]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, T, d]
        return self.to_out(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Sequential):
    """Pre-norm MLP: LayerNorm, Linear(dim, mult * dim), GELU, Linear(mult * dim, dim)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__(
            nn.LayerNorm(dim), nn.Linear(dim, mult * dim, bias=False), nn.GELU(), nn.Linear(mult * dim, dim, bias=False)
        )
