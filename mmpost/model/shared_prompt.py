"""Rows that share their prompt, computed with the prompt once: a preference pair's chosen and rejected answers,
a GRPO prompt's G completions.

A group of ``r`` rows (``media_repeat``) that hold the same prompt tokens before their first label is laid out as
one row: the prompt (left-padded), then ``r`` slots, one per row's answer (every token from its first label to its
last real token, right-padded to the longest answer). An explicit attention mask lets each answer token see the
prompt and the earlier tokens of its own slot, and nothing else; every token keeps the position id (1-D, or a
position scheme's, e.g. M-RoPE) it has in its own row, and fusion connectors' media masks follow those positions.
The logits predicting each label token come from the same (prompt or slot) position as in the row layout, so
``LMM.forward`` returns the same ``TokenLogits`` either way, in the same order, up to float rounding.

The prompt's tokens pass the decoder once instead of ``r`` times: for GRPO with G = 4 completions of 32 tokens
after a 237-token prompt, 365 tokens instead of 1,076. The mask is explicit (``mmpost.model.masks``), so this works
with the ``sdpa`` and ``eager`` attention implementations; with another one the rows are computed as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mmpost.interfaces import IGNORE, MediaBatch
from mmpost.model.masks import ATTENTION, attention_of, decoder_mask
from mmpost.model.outputs import TokenLogits
from mmpost.model.positions import positions_of


@dataclass
class SharedLayout:
    """Where every token of the shared layout comes from in the row layout.

    Attributes:
        rows, cols: ``[P, T']`` the row and column of each shared-layout token in the row layout (pads point at
            a pad of their group's first row).
        real: ``[P, T']`` True on real tokens.
        segment: ``[P, T']`` 0 on the prompt, ``g + 1`` in slot g, -1 on padding.
        predictors: ``[N]`` flat index (into ``[P * T']``) of the position whose hidden state predicts each
            label token, in the row layout's order of ``labels[:, 1:] != IGNORE``.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    real: torch.Tensor
    segment: torch.Tensor
    predictors: torch.Tensor

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` ``[..., B, T]`` of the row layout in the shared layout, ``[..., P, T']``."""
        return values[..., self.rows, self.cols]

    def allowed(self) -> torch.Tensor:
        """``[P, T', T']``: a query sees a real key before it in the prompt or in its own slot."""
        length = self.real.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=self.real.device).tril()
        key_seg, query_seg = self.segment[:, None, :], self.segment[:, :, None]
        return causal & self.real[:, None, :] & ((key_seg == 0) | (key_seg == query_seg))


def shared_layout(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, group: int, media_ids: set[int]
) -> SharedLayout | None:
    """The shared layout of ``group``-row groups, or None when it does not apply: a group whose rows differ
    before their first label, a row without a label, or a media placeholder (``media_ids``) after a prompt."""
    batch, _ = input_ids.shape
    if group < 2 or batch % group:
        return None
    labelled = labels != IGNORE
    if not bool(labelled[:, 1:].any(-1).all()):
        return None
    starts = labelled.int().argmax(-1).tolist()  # the first label token of each row
    real = attention_mask.bool()
    prompts, answers = [], []
    for r in range(batch):
        cols = real[r].nonzero().squeeze(-1)
        prompts.append(cols[cols < starts[r]])
        answers.append(cols[cols >= starts[r]])
    placeholders = torch.tensor(sorted(media_ids), dtype=input_ids.dtype, device=input_ids.device)
    for r in range(batch):
        first = r - r % group
        same = prompts[r].numel() == prompts[first].numel() and bool(
            (input_ids[r, prompts[r]] == input_ids[first, prompts[first]]).all()
        )
        if not same or prompts[r].numel() == 0 or bool(torch.isin(input_ids[r, answers[r]], placeholders).any()):
            return None
    groups = batch // group
    prompt_len = max(prompts[p * group].numel() for p in range(groups))
    slot = max(a.numel() for a in answers)
    width = prompt_len + group * slot
    device = input_ids.device
    pad_col = (~real).int().argmax(-1)  # a pad column of each row (any column when a row has none)
    rows = torch.empty(groups, width, dtype=torch.long, device=device)
    cols = torch.empty(groups, width, dtype=torch.long, device=device)
    segment = torch.full((groups, width), -1, dtype=torch.long, device=device)
    predictors = []
    for p in range(groups):
        first = p * group
        rows[p] = first
        cols[p] = pad_col[first]
        prompt = prompts[first]
        start = prompt_len - prompt.numel()
        cols[p, start:prompt_len] = prompt
        segment[p, start:prompt_len] = 0
        for g in range(group):
            r, answer = first + g, answers[first + g]
            at = prompt_len + g * slot
            rows[p, at : at + answer.numel()] = r
            cols[p, at : at + answer.numel()] = answer
            segment[p, at : at + answer.numel()] = g + 1
            # label token j of the answer is predicted by the last prompt token (j = 0) or by answer token j - 1
            targets = labelled[r, answer].nonzero().squeeze(-1)
            source = torch.where(targets == 0, prompt_len - 1, at + targets - 1)
            predictors.append(p * width + source)
    real_shared = segment >= 0
    return SharedLayout(rows, cols, real_shared, segment, torch.cat(predictors))


def shared_logits(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    media: Mapping[str, MediaBatch] | None,
    labels: torch.Tensor,
    group: int,
) -> TokenLogits | None:
    """The LMM ``model``'s ``TokenLogits`` for rows in groups of ``group`` computed in the shared layout, or None
    when the layout does not apply (then the caller computes the rows as they are)."""
    implementation = attention_of(model.base_llm)
    if implementation not in ATTENTION:
        return None
    layout = shared_layout(input_ids, attention_mask, labels, group, set(model.placeholder_ids.values()))
    if layout is None:
        return None
    text_positions = layout.gather(positions_of(attention_mask))
    position_ids = layout.gather(model.decoder_positions(input_ids, attention_mask, media, group))
    ids = layout.gather(input_ids).masked_fill(~layout.real, model.tokenizer.pad_token_id)
    embeds, fused = model.embed(ids, media, text_positions)
    mask = decoder_mask(layout.allowed(), implementation, embeds.dtype)
    with model.fusion_state.active(fused, text_positions):
        out = model.base_llm.get_decoder()(
            inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False
        )
    hidden = out.last_hidden_state.flatten(0, 1)[layout.predictors]  # [N, D]
    targets = labels[:, 1:]
    kept = targets != IGNORE
    return TokenLogits(model.logits_from_hidden(hidden), kept, targets[kept])
