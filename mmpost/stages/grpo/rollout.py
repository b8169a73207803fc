"""GRPO rollouts: sample G completions per prompt, score them, and lay them out as training rows.

Sampling is the LMM's own ``generate()`` with the KV cache; by default each prompt (media and text) is
prefilled once and its cache shared by its G samples (``share_prefill``). The rows of a rollout keep
the prompts' order, G consecutive rows per prompt, so the prompts' media are encoded once per prompt
in the loss forward too (``media_repeat=G``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmpost.data.batches import PromptBatch
from mmpost.interfaces import IGNORE, MediaBatch
from mmpost.losses.grpo import group_advantages
from mmpost.model.completions import completion_mask, eos_token_ids
from mmpost.model.lmm import LMM
from mmpost.rewards import RewardSet


@dataclass
class Rollout:
    """One micro-batch of prompts with their G completions each, scored.

    Attributes:
        input_ids: ``[P*G, T_p + L]`` left-padded prompt followed by the completion (padded on the right).
        attention_mask: ``[P*G, T_p + L]`` 1 on prompt and completion tokens (through the end-of-sequence token).
        labels: ``[P*G, T_p + L]`` completion tokens, ``IGNORE`` elsewhere.
        media: the prompts' media, once per prompt.
        advantages: ``[P*G]`` group-normalised advantages.
        rewards: ``[P*G]`` weighted reward totals; ``per_function``: each reward function's raw values.
        lengths: ``[P*G]`` completion lengths in tokens; ``zero_variance``: ``[P]`` groups with equal rewards.
        texts: the decoded completions.
        counted: False for a stand-in prompt (``mmpost.data.loader.StandIn``): its loss mask is zeroed and it is
            left out of the metrics.
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


@torch.no_grad()
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
    """Samples ``group_size`` completions per prompt of ``batch``, scores them and returns the training rows."""
    ids, mask = batch.input_ids, batch.attention_mask
    completions = model.generate(
        ids,
        mask,
        batch.media,
        max_new_tokens=max_completion_length,
        num_samples=group_size,
        share_prefill=share_prefill,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
    )  # [P*G, L]
    done = completion_mask(completions, eos_token_ids(model))  # [P*G, L]
    texts = [
        model.tokenizer.decode(row[keep], skip_special_tokens=True) for row, keep in zip(completions, done, strict=True)
    ]
    fields = [f for f in batch.fields for _ in range(group_size)]
    total, per_function = rewards(texts, fields)
    total = total.to(ids.device)
    advantages, zero_variance = group_advantages(total, group_size, scale=scale_rewards)
    prompt_ids = ids.repeat_interleave(group_size, dim=0)
    prompt_mask = mask.repeat_interleave(group_size, dim=0)
    prompt_labels = torch.full_like(prompt_ids, IGNORE)
    completion_labels = torch.where(done, completions, torch.full_like(completions, IGNORE))
    pad = model.tokenizer.pad_token_id
    return Rollout(
        input_ids=torch.cat([prompt_ids, torch.where(done, completions, torch.full_like(completions, pad))], 1),
        attention_mask=torch.cat([prompt_mask, done.long()], 1),
        labels=torch.cat([prompt_labels, completion_labels], 1),
        media=batch.media,
        advantages=advantages,
        rewards=total,
        per_function=per_function,
        lengths=done.sum(-1),
        zero_variance=zero_variance,
        texts=texts,
    )
