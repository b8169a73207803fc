"""REINFORCE leave-one-out: per-group baselines, the KL penalty folded into rewards, and the sequence-level loss.

This module owns the arithmetic of one RLOO step once ``k`` completions per prompt have been sampled, scored and their
per-token log-probabilities computed. Layout follows ``mmpost.losses.grpo``: rewards are ``[P*k]``, prompt ``p``'s
completions in rows ``p*k .. p*k + k - 1``.

RLOO (Ahmadian et al. 2024) uses the mean reward of the other ``k - 1`` completions of the same prompt as each one's
baseline, ``A_i = R_i - (Σ_j R_j - R_i) / (k - 1)``, which is ``k / (k - 1)`` times the deviation from the group
mean. The KL to the reference is not a loss term: it is subtracted from the reward of the whole sequence before the
baseline, ``R = r - β Σ_t (log π_old - log π_ref)``, with the plain log-ratio (k1) of the sampling policy, so it
reaches the gradient only through the advantages and may be negative.

The loss is what TRL 1.16's ``RLOOTrainer`` computes, which is not the paper's plain REINFORCE but a PPO-style clip on
the *sequence* ratio ``ρ = exp(Σ_t log π - Σ_t log π_old)``: ``-min(ρ A, clip(ρ, 1 - ε_low, 1 + ε_high) A)`` per
sequence, averaged over sequences. At ``ρ = 1`` (one update per generation) its gradient is REINFORCE's,
``-A ∇ log π(y)``. Two further choices of TRL's are kept: a NaN reward marks a completion that could not be scored,
which is left out of its siblings' baselines and gets advantage 0; and the optional normalisation of advantages is
over the whole generation batch, not per group, with the unbiased std plus ``eps``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def sequence_kl(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k1 KL estimate of each completion, ``Σ_t (log π - log π_ref)`` over its tokens.

    Args:
        logps: ``[B, T]`` log-probability of each completion token under the policy that sampled it.
        ref_logps: ``[B, T]`` the same under the reference.
        mask: ``[B, T]`` 1 on completion tokens, 0 on padding.

    Returns:
        ``[B]`` detached summed log-ratio, in at least fp32.
    """
    dtype = torch.promote_types(logps.dtype, torch.float32)
    return ((logps.to(dtype) - ref_logps.to(dtype)) * mask.to(dtype)).sum(dim=1).detach()


def _nan_std(x: torch.Tensor) -> torch.Tensor:
    """Unbiased std of the non-NaN entries of ``x``."""
    count = (~torch.isnan(x)).sum()
    return (torch.nanmean((x - torch.nanmean(x)) ** 2) * count / (count - 1)).sqrt()


def rloo_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    kl: torch.Tensor | None = None,
    beta: float = 0.0,
    normalize: bool = False,
    eps: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Leave-one-out advantage of each completion, after the KL penalty is taken from its reward.

    Args:
        rewards: ``[P*k]`` scalar rewards, ordered group by group; NaN for a completion that could not be scored.
        group_size: ``k``, completions per prompt.
        kl: ``[P*k]`` per-sequence KL estimate (``sequence_kl``); required when ``beta > 0``.
        beta: weight of the KL penalty; must be ``>= 0``.
        normalize: standardise the advantages over the whole batch, ``(A - mean) / (std + eps)``.
        eps: added to the std when normalising.

    Returns:
        ``(advantages, zero_variance)``: ``[P*k]`` advantages in at least fp32, 0 for unscored completions, for
        groups with a single scored completion and for ``k == 1``; and a ``[P]`` bool tensor, true for groups whose
        scored (penalised) rewards are all equal.

    Raises:
        ValueError: if ``group_size < 1`` or does not divide the rewards, ``beta < 0``, or ``beta > 0`` without ``kl``.
    """
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"group_size must be >= 1 and divide the {rewards.numel()} rewards, got {group_size}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and kl is None:
        raise ValueError(f"beta={beta} penalises the reward by the KL, so kl is required")

    dtype = torch.promote_types(rewards.dtype, torch.float32)
    penalised = rewards.to(dtype)
    if beta > 0:
        penalised = penalised - beta * kl.to(dtype)
    grouped = penalised.view(-1, group_size)  # [P, k]
    scored = ~torch.isnan(grouped)  # [P, k]

    if group_size > 1:
        others = scored.sum(dim=1, keepdim=True) - 1  # [P, 1] scored siblings of a scored completion
        baseline = (grouped.nansum(dim=1, keepdim=True) - grouped) / others  # [P, k], NaN where unscored or 0/0
        advantages = (grouped - baseline).reshape(-1)
    else:
        advantages = torch.zeros_like(penalised)
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (_nan_std(advantages) + eps)
    advantages = torch.nan_to_num(advantages, nan=0.0)

    highest = torch.where(scored, grouped, -torch.inf).amax(dim=1)  # [P]
    lowest = torch.where(scored, grouped, torch.inf).amin(dim=1)
    zero_variance = ~(highest > lowest)
    return advantages, zero_variance


@dataclass
class RLOOLoss:
    """Sequence-level clipped loss and what is logged beside it.

    Attributes:
        loss: scalar, the per-sequence loss summed and divided by the number of sequences.
        clip_fraction: scalar detached fraction of sequences where the clipped term was the active one
            (``ρ > 1 + ε_high`` with ``A > 0``, or ``ρ < 1 - ε_low`` with ``A < 0``).
    """

    loss: torch.Tensor
    clip_fraction: torch.Tensor


def rloo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    num_sequences: int | None = None,
) -> RLOOLoss:
    """Clipped surrogate on the ratio of whole-sequence probabilities.

    Args:
        logps: ``[B, T]`` log-probability of each completion token under the policy being trained.
        old_logps: ``[B, T]`` the same under the policy that sampled the completions.
        advantages: ``[B]`` advantage of each completion (``rloo_advantages``).
        mask: ``[B, T]`` 1 on completion tokens, 0 on padding.
        epsilon_low: lower clip range, ``ρ >= 1 - ε_low``.
        epsilon_high: upper clip range, ``ρ <= 1 + ε_high``.
        num_sequences: the normaliser (default ``B``). Pass the size of the whole generation batch when ``logps`` is
            one micro-batch of it, so that the micro-batch losses sum to the batch's.

    Returns:
        ``RLOOLoss``, in at least fp32 (fp64 inputs stay fp64).
    """
    dtype = torch.promote_types(logps.dtype, torch.float32)
    mask = mask.to(dtype)
    log_ratio = ((logps.to(dtype) - old_logps.to(dtype)) * mask).sum(dim=1)  # [B] log π(y)/π_old(y)
    adv = advantages.to(dtype)  # [B]

    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    per_sequence = -torch.minimum(ratio * adv, clipped * adv)  # [B]
    batch = logps.size(0) if num_sequences is None else num_sequences

    clipped_active = ((ratio > 1.0 + epsilon_high) & (adv > 0)) | ((ratio < 1.0 - epsilon_low) & (adv < 0))  # [B]
    return RLOOLoss(loss=per_sequence.sum() / batch, clip_fraction=clipped_active.to(dtype).mean().detach())
