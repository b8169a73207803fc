"""Explicit attention masks for the decoder: rows whose tokens may not all see each other (packed samples, answers
that share a prompt). transformers passes a 4-D mask to its attention as it is; ``sdpa`` takes it boolean,
``eager`` adds it, and flash attention takes none, so these layouts need one of the first two."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mmpost.interfaces import MediaBatch

ATTENTION = ("sdpa", "eager")


def attention_of(llm) -> str | None:
    """The attention implementation the LLM runs (``sdpa``, ``eager``, ``flash_attention_2``, ...)."""
    return getattr(llm.config, "_attn_implementation", None)


def decoder_mask(allowed: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """``[B, T, T]`` allowed (query, key) pairs as the ``[B, 1, T, T]`` mask ``implementation`` takes. A query with no
    key (padding) is let see itself, so that no softmax row is empty; its output is never read."""
    length = allowed.shape[-1]
    allowed = (allowed | torch.eye(length, dtype=torch.bool, device=allowed.device)).unsqueeze(1)
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """``[B, T, T]``: a token sees the earlier tokens of its own segment (``segments`` ``[B, T]``: 1, 2, ... per
    packed sample, 0 on padding)."""
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    return causal & (segments[:, None, :] == segments[:, :, None]) & (segments[:, None, :] > 0)


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` position ids restarting at 0 at the first token of every segment (0 on padding)."""
    index = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(-1).values
    return torch.where(segments > 0, index - first, torch.zeros_like(index))


def packed_hidden(
    model: Any, input_ids: torch.Tensor, segments: torch.Tensor, media: Mapping[str, MediaBatch] | None
) -> torch.Tensor:
    """The LMM ``model``'s last decoder hidden states ``[B, T, D]`` for packed rows (``segments`` as in
    ``segment_mask``): each sample sees only its own tokens and media, its positions starting at 0, as if it were
    alone in its row.

    Raises:
        ValueError: for an LLM whose attention takes no explicit mask, or a model with its own position scheme.
    """
    implementation = attention_of(model.base_llm)
    if implementation not in ATTENTION:
        raise ValueError(
            f"data.packing needs the LLM's sdpa or eager attention (an explicit mask); this LLM runs {implementation}"
        )
    if model.positions is not None:
        raise ValueError("data.packing: this model computes its own position ids (M-RoPE); set data.packing: false")
    positions = segment_positions(segments)
    embeds, fused = model.embed(input_ids, media, positions, segments=segments)
    mask = decoder_mask(segment_mask(segments), implementation, embeds.dtype)
    with model.fusion_state.active(fused, positions, segments):
        out = model.base_llm.get_decoder()(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False
        )
    return out.last_hidden_state
