"""Running fusion connectors' cross-attention blocks before the LLM's decoder layers.

The blocks wrap the call of a transformers decoder layer through PyTorch's forward pre-hook: the hook
takes the layer's input hidden states, runs the block, and hands the result to the original layer.
A wrapper module in the layer list would do the same but rename every LLM weight
(``layers.3.self_attn`` -> ``layers.3.layer.self_attn``), which breaks ``save_pretrained``, LoRA
adapter names and exports, and hides the attributes some decoders read from their layers (Qwen2
reads ``decoder_layer.attention_type``). With the hook the LLM's modules and state dict are untouched;
the blocks' weights belong to the connector.

Media reach the hooks through a ``FusionState`` that the LMM fills for the duration of one forward or
one ``generate`` call. Masking is done in position-id space: a text position attends to a medium when
the medium's marker token has a position id no larger than its own. During generation with the KV
cache the decoder sees only the new tokens, whose position ids follow the prompt's, so they attend to
every medium of their sample, as they would in a full forward. In packed rows (several samples in one row,
position ids restarting) a text position also attends only to the media of its own sample (segment).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mmpost.interfaces import FusionConnector


@dataclass
class FusionMedia:
    """One modality's media for a batch, laid out per sample.

    Attributes:
        values: ``[B, S, D_m]`` media vectors of each sample's media, concatenated, zero-padded.
        valid: ``[B, S]`` True where a vector is real.
        position: ``[B, S]`` position id of the marker token of the medium each vector belongs to.
        segment: ``[B, S]`` the packed sample (segment id) of that marker; None when rows are not packed.
    """

    values: torch.Tensor
    valid: torch.Tensor
    position: torch.Tensor
    segment: torch.Tensor | None = None

    def for_batch(self, batch_size: int) -> FusionMedia:
        """Repeats each sample's media when generate() expands the batch (several return sequences)."""
        if batch_size == self.values.shape[0]:
            return self
        repeat = batch_size // self.values.shape[0]
        tensors = (self.values, self.valid, self.position)
        return FusionMedia(*(t.repeat_interleave(repeat, dim=0) for t in tensors))


@dataclass
class FusionState:
    """The media the hooks see during the current forward or generate call (empty otherwise)."""

    media: dict[str, FusionMedia] = field(default_factory=dict)
    prompt_positions: torch.Tensor | None = None  # [B, T] position ids of the full prompt
    segments: torch.Tensor | None = None  # [B, T] packed samples' segment ids, None when rows are not packed
    # per modality, (position ids, batch size, media, allowed) of the last layer call: the layers of one
    # forward (or one generation step) share their position ids, so the mask is built once for all
    masks: dict[str, tuple] = field(default_factory=dict)

    @contextmanager
    def active(
        self, media: Mapping[str, FusionMedia], prompt_positions: torch.Tensor, segments: torch.Tensor | None = None
    ):
        self.media, self.prompt_positions, self.segments, self.masks = dict(media), prompt_positions, segments, {}
        try:
            yield
        finally:
            self.media, self.prompt_positions, self.segments, self.masks = {}, None, None, {}

    def attention(self, modality: str, hidden: torch.Tensor, positions: torch.Tensor | None):
        """The modality's media for ``hidden``'s batch, and which of them each position may attend to
        (``[B, T, S]``), or None when this forward has none of its media."""
        media = self.media.get(modality)
        if media is None:
            return None
        cached = self.masks.get(modality)
        if positions is not None and cached and cached[0] is positions and cached[1] == hidden.shape[0]:
            return cached[2], cached[3]
        key = positions
        media = media.for_batch(hidden.shape[0])
        if positions is None:  # decoders that do not pass position ids to their layers
            if self.prompt_positions is not None and self.prompt_positions.shape[-1] == hidden.shape[1]:
                positions = self.prompt_positions
            else:  # decoding past the prompt: every medium precedes
                positions = torch.full(hidden.shape[:2], torch.iinfo(torch.long).max, device=hidden.device)
        allowed = media.valid[:, None, :] & (media.position[:, None, :] <= positions[..., None])  # [B, T, S]
        if self.segments is not None and media.segment is not None:
            allowed &= media.segment[:, None, :] == self.segments[..., None]
        self.masks[modality] = (key, hidden.shape[0], media, allowed)
        return media, allowed


def layout_media(
    values: torch.Tensor,
    mask: torch.Tensor | None,
    markers: torch.Tensor,
    position_ids: torch.Tensor,
    segments: torch.Tensor | None = None,
) -> FusionMedia:
    """Groups the batch's media by row.

    Args:
        values: ``[K, S_m, D_m]`` vectors of the K media of the batch, in marker order (row-major).
        mask: ``[K, S_m]`` True where real, or None.
        markers: ``[B, T]`` True at marker tokens; exactly K of them.
        position_ids: ``[B, T]`` position ids of the batch.
        segments: ``[B, T]`` segment ids of packed rows, or None.
    """
    rows, cols = markers.nonzero(as_tuple=True)  # row-major: the order the collator stacked the media
    batch, per_medium = markers.shape[0], values.shape[1]
    counts = torch.bincount(rows, minlength=batch)
    slots = int(counts.max()) if rows.numel() else 0
    # slot of each medium within its sample: its index minus the index of the sample's first medium
    first = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rows.numel(), device=rows.device) - first[rows]
    out_values = values.new_zeros(batch, slots, per_medium, values.shape[-1])
    out_valid = torch.zeros(batch, slots, per_medium, dtype=torch.bool, device=values.device)
    out_position = torch.zeros(batch, slots, per_medium, dtype=torch.long, device=values.device)
    out_values[rows, slot] = values
    out_valid[rows, slot] = True if mask is None else mask.bool()
    out_position[rows, slot] = position_ids[rows, cols].unsqueeze(-1).expand(-1, per_medium)
    flat = (batch, slots * per_medium)
    segment = None
    if segments is not None:
        out_segment = torch.zeros(batch, slots, per_medium, dtype=torch.long, device=values.device)
        out_segment[rows, slot] = segments[rows, cols].unsqueeze(-1).expand(-1, per_medium)
        segment = out_segment.reshape(flat)
    return FusionMedia(out_values.reshape(*flat, -1), out_valid.reshape(flat), out_position.reshape(flat), segment)


class FusionHook:
    """Forward pre-hook of one decoder layer: runs the modality's block on the layer's input."""

    def __init__(self, state: FusionState, modality: str, block: nn.Module) -> None:
        self.state, self.modality, self.block = state, modality, block

    def __call__(self, layer: nn.Module, args: tuple, kwargs: dict[str, Any]):
        hidden = args[0] if args else kwargs["hidden_states"]
        found = self.state.attention(self.modality, hidden, kwargs.get("position_ids"))
        if found is None:
            return None
        media, allowed = found
        dtype = next(self.block.parameters()).dtype
        new = self.block(hidden.to(dtype), media.values.to(dtype), allowed).to(hidden.dtype)
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}


def install(
    layers: nn.ModuleList, state: FusionState, modality: str, connector: FusionConnector
) -> list[RemovableHandle]:
    """Runs ``connector``'s blocks before its decoder layers; returns the handles that undo it."""
    indices = connector.layer_indices()
    if not indices:
        raise ValueError(f"{modality}: the fusion connector places no block in an LLM of {len(layers)} layers")
    return [
        layers[i].register_forward_pre_hook(FusionHook(state, modality, connector.block(i)), with_kwargs=True)
        for i in indices
    ]
