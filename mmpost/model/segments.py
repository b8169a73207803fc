"""Packed rows without a dense mask: the samples of a packed micro-batch laid end to end in one row, and attention
run within each sample only.

A block-diagonal ``[T, T]`` mask makes the attention kernel visit every (query, key) block of the row, and it
keeps rows padded to the longest one. Here the padding is dropped, the micro-batch becomes a single row of its
real tokens, and every decoder layer attends sample by sample (causal, through the LLM's own ``sdpa`` forward) —
the arithmetic of the samples alone, without the cross-sample blocks. LLMs running flash attention get the same
row with transformers' own variable-length keyword arguments (``cu_seq_lens_q`` ...), which their kernels read.

The attention function is registered with transformers under ``SEGMENTED`` and switched in for the packed
forward only: transformers builds no mask for it, and passes the decoder's keyword arguments through to it. An
LLM class that drops them would attend across samples, so the function refuses to run without its bounds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

SEGMENTED = "mmpost_segmented"
FLASH = ("flash_attention_2", "flash_attention_3")
VARLEN = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def segmented_attention(module, query, key, value, attention_mask, cu_seq_lens_q=None, **kwargs):
    """transformers' attention signature (``query`` ``[1, H, N, D]``, keys and values ``[1, H_kv, N, D]``):
    causal attention within each span ``cu_seq_lens_q[i] : cu_seq_lens_q[i + 1]`` of the row; returns the output
    ``[1, N, H, D]`` and no weights."""
    if cu_seq_lens_q is None:
        raise RuntimeError(
            f"{type(module).__name__} did not pass the packed row's sample bounds to its attention: its LLM class "
            "drops the decoder's keyword arguments, so data.packing cannot keep the samples apart; set "
            "data.packing: false"
        )
    rest = {k: v for k, v in kwargs.items() if k not in VARLEN}
    pieces = [
        sdpa_attention_forward(
            module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, is_causal=True, **rest
        )[0]
        for a, b in pairwise(cu_seq_lens_q.tolist())
    ]
    return torch.cat(pieces, dim=1), None


AttentionInterface.register(SEGMENTED, segmented_attention)


@dataclass
class FlatRow:
    """A packed micro-batch as one row of its real tokens.

    Attributes:
        keep: ``[B, T]`` the real tokens of the packed batch, in row-major order.
        segments: ``[1, N]`` the sample of each token, numbered 1, 2, ... across the whole batch.
        bounds: ``[S + 1]`` int32 offsets of the samples in the row (``cu_seq_lens``).
        longest: the longest sample's length.
    """

    keep: torch.Tensor
    segments: torch.Tensor
    bounds: torch.Tensor
    longest: int

    @classmethod
    def of(cls, segments: torch.Tensor) -> FlatRow:
        """``segments`` ``[B, T]``: 1, 2, ... per packed sample of each row, 0 on padding."""
        keep = segments > 0
        per_row = segments.amax(dim=1)
        offset = per_row.cumsum(0) - per_row
        flat = (segments + offset[:, None])[keep]
        lengths = torch.bincount(flat)[1:]
        bounds = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        return cls(keep, flat[None], bounds, int(lengths.max()))

    def flatten(self, rows: torch.Tensor) -> torch.Tensor:
        """``[B, T, ...]`` → ``[1, N, ...]``: the real tokens' entries."""
        return rows[self.keep][None]

    def unflatten(self, flat: torch.Tensor) -> torch.Tensor:
        """``[1, N, D]`` → ``[B, T, D]``, zeros on padding."""
        out = flat.new_zeros(*self.keep.shape, flat.shape[-1])
        return out.masked_scatter(self.keep[..., None], flat[0])

    def attention_kwargs(self) -> dict:
        """The variable-length keyword arguments the decoder passes to its attention."""
        return dict(
            cu_seq_lens_q=self.bounds, cu_seq_lens_k=self.bounds, max_length_q=self.longest, max_length_k=self.longest
        )


@contextmanager
def segmented(llm) -> Iterator[None]:
    """Within the block, the LLM's ``sdpa`` / ``eager`` attention is ``segmented_attention`` (flash attention is
    kept: it reads the same bounds itself)."""
    config = llm.config
    implementation = config._attn_implementation
    if implementation in FLASH:
        yield
        return
    config._attn_implementation = SEGMENTED
    try:
        yield
    finally:
        config._attn_implementation = implementation
