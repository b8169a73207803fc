"""Group-relative policy optimisation: per-group advantages and the clipped token-level surrogate loss.

This module owns the arithmetic of one policy-gradient step once completions have been sampled, scored and their
per-token log-probabilities computed: turning a group's rewards into advantages, and turning log-probabilities and
advantages into a scalar loss. Sampling, rewards and the forward passes belong to the caller.

The surrogate is PPO's, per completion token: ``-min(ρ A, clip(ρ, 1 - ε_low, 1 + ε_high) A)`` with
``ρ = π / π_old``, plus ``β k3`` where ``k3 = π_ref/π - log(π_ref/π) - 1`` is the KL estimator of GRPO. Three ways of
reducing it over tokens are offered:

- ``grpo``: GRPO (Shao et al. 2024, DeepSeekMath): mean over each sequence's tokens, then over sequences.
- ``dapo``: DAPO (Yu et al. 2025): sum over every token, divided by the number of tokens, so long completions weigh
  more. ``ε_high > ε_low`` gives DAPO's "clip-higher".
- ``dr_grpo``: Dr. GRPO (Liu et al. 2025): sum over every token, divided by a constant, sequences ×
  ``max_completion_length``, which removes the length bias; pair it with ``group_advantages(scale=False)``, which drops
  the division by the group's std as that paper does.

Where this departs from the papers: advantages divide by the group's unbiased (Bessel-corrected) std plus ``eps``, a
convention the GRPO paper leaves open and TRL uses; DAPO's dynamic sampling is not applied here (``group_advantages``
returns which groups have zero variance, for the caller to drop or count) and neither is its overlong reward shaping;
the importance ratio is per token (not GSPO's per sequence) and there is no dual clip. The normalisers of all three
reductions can be passed in, so that a generation batch split into micro-batches sums to the loss of the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

AGGREGATIONS = ("grpo", "dapo", "dr_grpo")


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantage of each completion relative to the other completions of its prompt.

    Args:
        rewards: ``[P*G]`` scalar rewards, ordered group by group: prompt ``p``'s completions are rows
            ``p*G .. p*G + G - 1``.
        group_size: ``G``, completions per prompt.
        scale: divide by the group's std (GRPO, DAPO); ``False`` only subtracts the group mean (Dr. GRPO).
        eps: added to the std, so a group of equal rewards gets zero advantages rather than 0/0.

    Returns:
        ``(advantages, zero_variance)``: ``[P*G]`` advantages ``(r - mean) / (std + eps)`` (or ``r - mean``), in at
        least fp32, with ``std`` the unbiased std of the group (0 when ``G == 1``); and a ``[P]`` bool tensor, true
        for groups whose rewards are all equal and so carry no learning signal.

    Raises:
        ValueError: if ``group_size < 1`` or the number of rewards is not a multiple of it.
    """
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"group_size must be >= 1 and divide the {rewards.numel()} rewards, got {group_size}")
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    grouped = rewards.to(dtype).view(-1, group_size)  # [P, G]
    advantages = grouped - grouped.mean(dim=1, keepdim=True)  # [P, G]
    if scale:
        # a single sample has no spread; the unbiased estimator would give NaN
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])  # [P, 1]
        advantages = advantages / (std + eps)
    zero_variance = grouped.amax(dim=1) == grouped.amin(dim=1)  # [P]
    return advantages.reshape(-1), zero_variance


@dataclass
class PolicyLoss:
    """Aggregated policy loss and what is logged beside it.

    Attributes:
        loss: scalar loss, reduced as the aggregation asks.
        kl: scalar detached mean of the per-token k3 KL over completion tokens (0 when ``beta == 0``).
        clip_fraction: scalar detached fraction of completion tokens where the clipped term was the active one
            (``ρ > 1 + ε_high`` with ``A > 0``, or ``ρ < 1 - ε_low`` with ``A < 0``).
    """

    loss: torch.Tensor
    kl: torch.Tensor
    clip_fraction: torch.Tensor


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    aggregation: str = "grpo",
    max_completion_length: int | None = None,
    num_sequences: int | None = None,
    num_tokens: float | None = None,
) -> PolicyLoss:
    """Clipped surrogate loss, with an optional k3 KL penalty, reduced over completion tokens.

    Args:
        logps: ``[B, T]`` log-probability of each completion token under the policy being trained.
        old_logps: ``[B, T]`` the same under the policy that sampled the completions.
        advantages: ``[B]`` advantage of each completion.
        mask: ``[B, T]`` 1 on completion tokens, 0 on padding.
        epsilon_low: lower clip range, ``ρ >= 1 - ε_low``.
        epsilon_high: upper clip range, ``ρ <= 1 + ε_high``.
        beta: weight of the k3 KL to the reference, added per token before the reduction; must be ``>= 0``.
        ref_logps: ``[B, T]`` log-probabilities under the reference; needed when ``beta > 0``.
        aggregation: one of ``AGGREGATIONS``.
        max_completion_length: the constant of ``dr_grpo``'s normaliser; required by it.
        num_sequences: sequences the ``grpo`` and ``dr_grpo`` normalisers count (default ``B``). Pass the size of the
            whole generation batch when ``logps`` is one micro-batch of it.
        num_tokens: completion tokens the ``dapo`` normaliser counts (default ``mask.sum()``). Pass the count over
            the whole generation batch, across processes, when ``logps`` is one micro-batch of it.

    Returns:
        ``PolicyLoss``, in at least fp32 (fp64 inputs stay fp64).

    Raises:
        ValueError: for an unknown ``aggregation``, ``beta < 0``, ``beta > 0`` without ``ref_logps``, or ``dr_grpo``
            without ``max_completion_length``.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logps is None:
        raise ValueError(f"beta={beta} adds a KL penalty to the reference, so ref_logps is required")
    if aggregation == "dr_grpo" and max_completion_length is None:
        raise ValueError("aggregation 'dr_grpo' divides by max_completion_length, which is required")

    dtype = torch.promote_types(logps.dtype, torch.float32)
    logps, old_logps = logps.to(dtype), old_logps.to(dtype)  # [B, T]
    adv = advantages.to(dtype).unsqueeze(1)  # [B, 1]
    mask = mask.to(dtype)  # [B, T]

    ratio = torch.exp(logps - old_logps)  # [B, T]
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high) * adv
    per_token = -torch.minimum(unclipped, clipped)  # [B, T]

    tokens_here = mask.sum().clamp(min=1.0)
    kl = torch.zeros((), dtype=dtype, device=logps.device)
    if beta > 0:
        log_ref_ratio = ref_logps.to(dtype) - logps  # [B, T] log π_ref/π
        k3 = torch.exp(log_ref_ratio) - log_ref_ratio - 1.0  # [B, T], >= 0
        per_token = per_token + beta * k3
        kl = ((k3 * mask).sum() / tokens_here).detach()

    masked = per_token * mask  # [B, T]
    batch = logps.size(0) if num_sequences is None else num_sequences
    if aggregation == "grpo":
        loss = (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).sum() / batch
    elif aggregation == "dapo":
        loss = masked.sum() / (tokens_here if num_tokens is None else num_tokens)
    else:  # dr_grpo
        loss = masked.sum() / (batch * max_completion_length)

    clipped_active = ((ratio > 1.0 + epsilon_high) & (adv > 0)) | ((ratio < 1.0 - epsilon_low) & (adv < 0))  # [B, T]
    clip_fraction = ((clipped_active.to(dtype) * mask).sum() / tokens_here).detach()
    return PolicyLoss(loss=loss, kl=kl, clip_fraction=clip_fraction)
