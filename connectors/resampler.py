"""Perceiver resampler (Flamingo, IDEFICS): a fixed number of learnt latents read the features.

Each layer lets the latents attend to the features and to themselves (keys and values are the
concatenation of both, as in Flamingo), then applies a feed-forward block; both are residual and
pre-norm. However many features an image or a clip gives, the output is ``num_latents`` vectors,
which makes it a token connector with a fixed token count and the front of the ``xattn`` connector.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmpost.connectors.attention import CrossAttention, FeedForward, check_heads
from mmpost.interfaces import Connector


class PerceiverLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ff_mult: int) -> None:
        super().__init__()
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, dim, heads)
        self.ff = FeedForward(dim, ff_mult)

    def forward(self, latents: torch.Tensor, media: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        q = self.norm_latents(latents)
        kv = torch.cat([self.norm_media(media), q], dim=1)  # [K, N + L, dim]
        latents = latents + self.attn(q, kv, allowed)
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """``num_latents`` latents of width ``dim`` after ``layers`` perceiver layers, then a LayerNorm.

    Args:
        dim: width of the features and the latents.
        num_latents: output vectors per medium.
        layers: perceiver layers.
        heads: attention heads (must divide ``dim``).
        ff_mult: feed-forward expansion.
    """

    def __init__(self, dim: int, num_latents: int, layers: int, heads: int, ff_mult: int = 4) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * 0.02)
        self.layers = nn.ModuleList(PerceiverLayer(dim, heads, ff_mult) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[K, N, dim]`` features (``[K, N]`` mask, True = real) to ``[K, num_latents, dim]``."""
        k = features.shape[0]
        latents = self.latents.unsqueeze(0).expand(k, -1, -1)
        allowed = None
        if mask is not None:  # latents always see each other; features only where real
            keep_latents = mask.new_ones(k, self.latents.shape[0])
            allowed = torch.cat([mask.bool(), keep_latents], dim=1).unsqueeze(1)  # [K, 1, N + L]
        for layer in self.layers:
            latents = layer(latents, features, allowed)
        return self.norm(latents)


class ResamplerConnector(Connector):
    """Perceiver resampler as a token connector: every medium becomes ``num_latents`` LLM tokens.

    Args:
        num_latents: tokens per medium.
        layers: perceiver layers.
        heads: attention heads; must divide ``dim``.
        dim: resampler width; default the encoder's width (features are projected to ``dim`` first
            when it differs).
        ff_mult: feed-forward expansion.
    """

    def __init__(
        self, num_latents: int = 64, layers: int = 2, heads: int = 8, dim: int | None = None, ff_mult: int = 4
    ) -> None:
        super().__init__()
        if num_latents < 1 or layers < 1:
            raise ValueError(f"resampler: num_latents and layers must be >= 1, got {num_latents}, {layers}")
        self.num_latents, self.layers, self.heads, self.dim, self.ff_mult = num_latents, layers, heads, dim, ff_mult

    def _build(self, in_dim: int, out_dim: int) -> None:
        dim = self.dim or in_dim
        check_heads("resampler", dim, self.heads, f"resampler (dim={dim}, encoder gives {in_dim})")
        self.proj_in = nn.Linear(in_dim, dim) if dim != in_dim else nn.Identity()
        self.resampler = PerceiverResampler(dim, self.num_latents, self.layers, self.heads, self.ff_mult)
        self.proj_out = nn.Linear(dim, out_dim)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj_out(self.resampler(self.proj_in(features), mask))  # [K, num_latents, D_llm]

    def num_tokens(self, num_features: int) -> int:
        return self.num_latents

    def spec(self) -> dict[str, Any]:
        return {
            "num_latents": self.num_latents,
            "layers": self.layers,
            "heads": self.heads,
            "dim": self.dim,
            "ff_mult": self.ff_mult,
        }
