"""Rows whose tokens may not all see each other: answers that share a prompt (an explicit mask) and packed samples
(one row, attention sample by sample). transformers passes a 4-D mask to its attention as it is; ``sdpa`` takes
it boolean, ``eager`` adds it, and flash attention takes none, so masks need one of the first two."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mmpost.interfaces import MediaBatch
from mmpost.model.segments import FLASH, FlatRow, segmented

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
    """The LMM ``model``'s last decoder hidden states ``[B, T, D]`` (zeros on padding) for packed rows:
    ``segments`` ``[B, T]`` numbers the samples of each row 1, 2, ... (0 on padding). Each sample sees only its own
    tokens and media, its positions starting at 0, as if it were alone in its row. The rows run as one row of their
    real tokens, attention sample by sample (``mmpost.model.segments``).

    Raises:
        ValueError: for an LLM whose attention is neither sdpa, eager nor flash attention, or a model with its own
            position scheme.
    """
    implementation = attention_of(model.base_llm)
    if implementation not in ATTENTION + FLASH:
        raise ValueError(f"data.packing needs the LLM's sdpa, eager or flash attention; this LLM runs {implementation}")
    if model.positions is not None:
        raise ValueError("data.packing: this model computes its own position ids (M-RoPE); set data.packing: false")
    row = FlatRow.of(segments)
    positions = segment_positions(row.segments)
    embeds, fused = model.embed(row.flatten(input_ids), media, positions, segments=row.segments)
    with model.fusion_state.active(fused, positions, row.segments), segmented(model.base_llm):
        out = model.base_llm.get_decoder()(
            inputs_embeds=embeds, position_ids=positions, use_cache=False, **row.attention_kwargs()
        )
    return row.unflatten(out.last_hidden_state)
