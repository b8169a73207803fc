"""GRPO rollouts: sample G completions per prompt, score them, and lay them out as training rows.

Sampling is the LMM's own ``generate()`` with the KV cache; by default each prompt (media and text) is
prefilled once and its cache shared by its G samples (``share_prefill``), and the prompts of a step's
micro-batches are sampled in one call (``merged_prompts``). The rows of a rollout keep
the prompts' order, G consecutive rows per prompt, so the prompts' media are encoded once per prompt
in the loss forward too (``media_repeat=G``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mmpost.data.batches import PromptBatch
from mmpost.interfaces import IGNORE, MediaBatch
from mmpost.losses.grpo import group_advantages
from mmpost.model.completions import completion_mask, eos_token_ids
from mmpost.model.lmm import LMM
from mmpost.reward_model import RewardRows
from mmpost.rewards import RewardSet

# (rewards [P*G], G) -> (advantages [P*G], zero_variance [P]), as ``mmpost.losses.grpo.group_advantages``
AdvantageFn = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Rollout:
    """One micro-batch of prompts with their G completions each, scored.

    Attributes:
        input_ids: ``[P*G, T_p + L]`` left-padded prompt followed by the completion (padded on the right).
        attention_mask: ``[P*G, T_p + L]`` 1 on prompt and completion tokens (through the end-of-sequence token).
        labels: ``[P*G, T_p + L]`` completion tokens, ``IGNORE`` elsewhere.
        media: the prompts' media, once per prompt.
        advantages: ``[P*G]`` advantages (group-normalised for GRPO).
        rewards: ``[P*G]`` weighted reward totals; ``per_function``: each reward function's raw values.
        lengths: ``[P*G]`` completion lengths in tokens; ``zero_variance``: ``[P]`` groups with equal rewards.
        texts: the decoded completions.
        counted: False for a stand-in prompt (``mmpost.data.loader.StandIn``): its loss mask is zeroed and it is
            left out of the metrics.
        prompt_width: ``T_p``, the column where the completions start.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    media: dict[str, MediaBatch]
    advantages: torch.Tensor
    rewards: torch.Tensor
    per_function: dict[str, torch.Tensor]
    lengths: torch.Tensor
    zero_variance: torch.Tensor
    texts: list[str]
    counted: bool = True
    prompt_width: int = 0


def merged_prompts(
    batches: list[PromptBatch], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, MediaBatch]] | None:
    """The prompts of several micro-batches as one left-padded batch (ids, mask, media), so that one ``generate``
    call samples a whole step: each decoding step then reads the weights once for every prompt of the step. None
    when their media do not stack (inputs padded to different widths per micro-batch)."""
    width = max(b.input_ids.shape[1] for b in batches)

    def left_pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value)

    ids = torch.cat([left_pad(b.input_ids, pad_id) for b in batches])
    mask = torch.cat([left_pad(b.attention_mask, 0) for b in batches])
    media: dict[str, MediaBatch] = {}
    for modality in {m for b in batches for m in b.media}:
        parts = [b.media[modality] for b in batches if modality in b.media]
        try:
            if isinstance(parts[0], torch.Tensor):
                media[modality] = torch.cat(parts)
            else:
                media[modality] = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        except RuntimeError:  # e.g. audio padded to each micro-batch's longest clip
            return None
    return ids, mask, media


@torch.no_grad()
def sample(
    model: LMM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    media: dict[str, MediaBatch],
    group_size: int,
    max_completion_length: int,
    temperature: float,
    top_p: float,
    share_prefill: bool,
) -> torch.Tensor:
    """``[P*G, L]`` sampled completions, G consecutive rows per prompt."""
    return model.generate(
        input_ids,
        attention_mask,
        media,
        max_new_tokens=max_completion_length,
        num_samples=group_size,
        share_prefill=share_prefill,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
    )


@torch.no_grad()
def score(
    model: LMM,
    batch: PromptBatch,
    completions: torch.Tensor,
    rewards: RewardSet,
    group_size: int,
    advantages: AdvantageFn,
) -> Rollout:
    """The training rows of ``batch``'s prompts and their sampled ``completions`` (``[P*G, L]``), scored, with the
    ``advantages`` of their rewards."""
    ids, mask = batch.input_ids, batch.attention_mask
    done = completion_mask(completions, eos_token_ids(model))  # [P*G, L]
    texts = [
        model.tokenizer.decode(row[keep], skip_special_tokens=True) for row, keep in zip(completions, done, strict=True)
    ]
    prompt_ids = ids.repeat_interleave(group_size, dim=0)
    prompt_mask = mask.repeat_interleave(group_size, dim=0)
    pad = model.tokenizer.pad_token_id
    input_ids = torch.cat([prompt_ids, torch.where(done, completions, torch.full_like(completions, pad))], 1)
    attention_mask = torch.cat([prompt_mask, done.long()], 1)
    rows = RewardRows(input_ids, attention_mask, batch.media, group_size) if rewards.needs_rows else None
    fields = [f for f in batch.fields for _ in range(group_size)]
    total, per_function = rewards(texts, fields, rows)
    total = total.to(ids.device)
    advantage, zero_variance = advantages(total, group_size)
    prompt_labels = torch.full_like(prompt_ids, IGNORE)
    completion_labels = torch.where(done, completions, torch.full_like(completions, IGNORE))
    return Rollout(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=torch.cat([prompt_labels, completion_labels], 1),
        media=batch.media,
        advantages=advantage,
        rewards=total,
        per_function=per_function,
        lengths=done.sum(-1),
        zero_variance=zero_variance,
        texts=texts,
        prompt_width=ids.shape[1],
    )


def sample_and_score(
    model: LMM,
    batch: PromptBatch,
    rewards: RewardSet,
    group_size: int,
    max_completion_length: int,
    temperature: float,
    top_p: float,
    share_prefill: bool,
    scale_rewards: bool,
) -> Rollout:
    """Samples ``group_size`` completions per prompt of ``batch``, scores them and returns the training rows, with
    GRPO's group-normalised advantages."""
    completions = sample(
        model,
        batch.input_ids,
        batch.attention_mask,
        batch.media,
        group_size,
        max_completion_length,
        temperature,
        top_p,
        share_prefill,
    )
    advantages = functools.partial(group_advantages, scale=scale_rewards)
    return score(model, batch, completions, rewards, group_size, advantages)
