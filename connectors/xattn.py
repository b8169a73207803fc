"""Flamingo fusion: gated cross-attention blocks run before every k-th decoder layer of the LLM.

The media path is an optional perceiver resampler over the encoder features (Flamingo uses 64
latents); the LLM's text stream keeps one marker token per medium. Each block is

    h = h + tanh(attn_gate) * CrossAttention(LayerNorm(h), media)
    h = h + tanh(ff_gate)   * FeedForward(h)

with both gates starting at 0, so a fresh model computes exactly what the bare LLM computes. Text
positions attend only to the media whose marker precedes (or is) them; positions with no media
before them are left unchanged by the block, which keeps text-only prompts exactly the LLM's.
The LMM (``mmpost.model.fusion``) runs the blocks before the decoder layers; this module holds them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmpost.connectors.attention import CrossAttention, FeedForward, check_heads
from mmpost.connectors.resampler import PerceiverResampler
from mmpost.interfaces import FusionConnector


class GatedCrossAttentionBlock(nn.Module):
    """One Flamingo block: tanh-gated cross-attention to the media and a tanh-gated feed-forward.

    Args:
        dim: the LLM's hidden width.
        media_dim: width of the media vectors.
        heads: attention heads; must divide ``dim``.
        ff_mult: feed-forward expansion.
    """

    def __init__(self, dim: int, media_dim: int, heads: int, ff_mult: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, media_dim, heads)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = FeedForward(dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, hidden: torch.Tensor, media: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """``hidden [B, T, dim]``, ``media [B, S, media_dim]``, ``allowed [B, T, S]`` bool -> ``[B, T, dim]``."""
        sees_media = allowed.any(dim=-1, keepdim=True)  # [B, T, 1]
        # A row with nothing to attend to would be all -inf (NaN out of softmax): let it see everything
        # and drop its result instead.
        attended = self.attn(self.norm(hidden), media, allowed | ~sees_media)
        hidden = hidden + torch.tanh(self.attn_gate) * attended * sees_media
        return hidden + torch.tanh(self.ff_gate) * self.ff(hidden) * sees_media


class CrossAttentionConnector(FusionConnector):
    """Flamingo-style fusion: a perceiver resampler and gated cross-attention before LLM layers.

    Args:
        every: a block runs before decoder layer ``i`` when ``(i + 1) % every == 0`` (Flamingo's
            ``cross_attn_every_n_layers``; 1 puts a block before every layer).
        heads: attention heads of the blocks; must divide the LLM's hidden width.
        ff_mult: feed-forward expansion of the blocks.
        num_latents: resampler latents per medium; 0 sends the encoder features themselves to the blocks.
        resampler_layers: perceiver layers of the resampler.
        resampler_heads: attention heads of the resampler; must divide the encoder width.
    """

    def __init__(
        self,
        every: int = 4,
        heads: int = 8,
        ff_mult: int = 4,
        num_latents: int = 64,
        resampler_layers: int = 2,
        resampler_heads: int = 8,
    ) -> None:
        super().__init__()
        if every < 1 or num_latents < 0:
            raise ValueError(f"xattn: every must be >= 1 and num_latents >= 0, got {every}, {num_latents}")
        self.every, self.heads, self.ff_mult = every, heads, ff_mult
        self.num_latents, self.resampler_layers, self.resampler_heads = num_latents, resampler_layers, resampler_heads

    def _build(self, in_dim: int, out_dim: int) -> None:
        check_heads("xattn", out_dim, self.heads, "LLM hidden")
        if self.num_latents:
            check_heads("xattn resampler", in_dim, self.resampler_heads, "encoder feature")
            self.resampler = PerceiverResampler(in_dim, self.num_latents, self.resampler_layers, self.resampler_heads)
        self.blocks = nn.ModuleDict(
            {str(i): GatedCrossAttentionBlock(out_dim, in_dim, self.heads, self.ff_mult) for i in self.layer_indices()}
        )

    def layer_indices(self) -> list[int]:
        return [i for i in range(self.num_layers) if (i + 1) % self.every == 0]

    def block(self, layer_index: int) -> nn.Module:
        return self.blocks[str(layer_index)]

    def media(self, features: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.num_latents:
            return features, mask
        return self.resampler(features, mask), None

    def spec(self) -> dict[str, Any]:
        return {
            "every": self.every,
            "heads": self.heads,
            "ff_mult": self.ff_mult,
            "num_latents": self.num_latents,
            "resampler_layers": self.resampler_layers,
            "resampler_heads": self.resampler_heads,
        }
