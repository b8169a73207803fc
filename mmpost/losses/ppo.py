"""PPO for RLHF: per-token rewards, GAE advantages and returns, and the clipped policy and value losses.

This module owns the arithmetic between a scored rollout and the loss of one PPO update. It follows the
``PPOTrainer`` of TRL 1.9 (``trl.experimental.ppo``, since removed from TRL), an implementation of the RLHF recipe of
Ziegler et al. 2019 and Stiennon et al. 2020 as Huang et al. 2024 lay it out ("The N+ implementation details of RLHF
with PPO"). Sampling, the reward model and the forward passes of policy, reference and value model belong to the
caller.

Rollout (``ppo_rollout``), on completions right-padded to ``T`` tokens with ``n`` real tokens each (EOS included):

- per-token reward ``r_t = -β KL_t``, with ``KL_t = log π_old - log π_ref`` (k1) or ``e^x - 1 - x`` with
  ``x = log π_ref - log π_old`` (k3), and 0 on padding; the scalar score is added at position ``n``, the first
  padding slot, or at ``T - 1`` when the completion fills the row. Landing one past EOS is TRL's convention
  (huggingface/trl#1893, #3750): the value at that slot, the value of the finished text, is trained to predict the
  score, and EOS sees the score through GAE.
- values are kept at positions ``0 .. n`` (the completion plus that slot) and zeroed beyond; GAE (Schulman et al.
  2016) runs back over every position, ``δ_t = r_t + γ V_{t+1} - V_t`` (``V_T = 0``), ``A_t = δ_t + γ λ A_{t+1}``;
  returns are ``A + V``.
- advantages are whitened over the completion tokens of the whole batch, with the unbiased variance,
  ``(A - mean) / sqrt(var + 1e-8)``, and zeroed on padding. Optionally the rewards are first rescaled the same way
  over positions ``0 .. n`` but keep their mean, ``(r - mean) / sqrt(var + 1e-8) + mean``.

Loss (``ppo_loss``), per micro-batch: the clipped surrogate ``max(-A ρ, -A clip(ρ, 1 - ε, 1 + ε))`` averaged over
completion tokens, and the clipped value loss ``½ max((V - R)², (clip(V, V_old ± ε_v) - R)²)`` averaged over
positions ``0 .. n``. Both are means over the micro-batch's own tokens, as TRL's are. TRL's logged approximate KL,
``½ mean((log π - log π_old)²)``, is a mean over every position of the ``[B, T]`` block with padding counted as 0;
it is kept so, for its numbers to be comparable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

KL_ESTIMATORS = ("k1", "k3")
Reduce = Callable[[torch.Tensor], torch.Tensor]


def _lengths(mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` completion lengths of a right-padded mask; raises if a row is not a run of ones then zeros."""
    lengths = mask.bool().sum(dim=1)  # [B]
    prefix = torch.arange(mask.size(1), device=mask.device) < lengths[:, None]  # [B, T]
    if not torch.equal(mask.bool(), prefix):
        raise ValueError("mask must be right-padded: each row a run of ones followed only by zeros")
    return lengths


def _value_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, T]`` bool, true at positions ``0 .. n``: the completion and the slot after it (none for an empty row,
    a stand-in that only joins a collective step)."""
    return (torch.arange(width, device=lengths.device) <= lengths[:, None]) & (lengths[:, None] > 0)


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, reduce: Reduce | None = None
) -> torch.Tensor:
    """Standardise ``values`` by the mean and unbiased variance of the entries where ``mask`` is true.

    Args:
        values: ``[B, T]`` tensor.
        mask: ``[B, T]`` bool, the entries the statistics are taken over.
        shift_mean: subtract the mean; ``False`` only divides by the std.
        reduce: sums a tensor over the processes of a distributed step, so that the statistics are those of every
            process's entries; None: this process's alone (TRL's).

    Returns:
        ``[B, T]`` ``(values - mean) / sqrt(var + 1e-8)`` (plus ``mean`` when ``shift_mean`` is false), over all
        entries; the caller zeroes the ones outside the mask.

    Raises:
        ValueError: if fewer than two entries are selected, where the unbiased variance is undefined.
    """
    reduce = reduce or (lambda t: t)
    count = reduce(mask.sum().to(values.dtype))
    if count < 2:
        raise ValueError(f"whitening needs at least 2 masked entries, got {int(count)}")
    mean = reduce((values * mask).sum()) / count
    var = reduce((((values - mean) ** 2) * mask).sum()) / (count - 1)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


@dataclass
class PPORollout:
    """What a scored rollout turns into before the PPO epochs.

    Attributes:
        rewards: ``[B, T]`` per-token rewards, the score included.
        advantages: ``[B, T]`` whitened GAE advantages, 0 on padding.
        returns: ``[B, T]`` targets of the value loss, un-whitened advantages plus values.
        kl: ``[B, T]`` per-token KL estimate, 0 on padding; TRL logs ``kl.sum(1).mean()``.
    """

    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    kl: torch.Tensor


def ppo_rollout(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    values: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float = 0.05,
    kl_estimator: str = "k1",
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten_rewards: bool = False,
    reduce: Reduce | None = None,
) -> PPORollout:
    """Per-token rewards, advantages and returns of a scored rollout.

    Args:
        logps: ``[B, T]`` log-probability of each completion token under the policy that sampled it.
        ref_logps: ``[B, T]`` the same under the reference.
        values: ``[B, T]`` value-model estimate at each position, the value of the text before that token.
        scores: ``[B]`` scalar score of each completion from the reward model.
        mask: ``[B, T]`` 1 on completion tokens (EOS included), 0 on padding; right-padded.
        kl_coef: β, the weight of the per-token KL penalty.
        kl_estimator: one of ``KL_ESTIMATORS``.
        gamma: discount γ.
        lam: GAE's λ.
        whiten_rewards: rescale the rewards to unit std about their mean, over positions ``0 .. n``, before GAE.
        reduce: as in ``masked_whiten``: both whitenings over every process's entries.

    Returns:
        ``PPORollout``, detached, in at least fp32 (fp64 inputs stay fp64).

    Raises:
        ValueError: for an unknown ``kl_estimator``, a mask that is not right-padded, or fewer than two entries to
            whiten over.
    """
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {kl_estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")
    lengths = _lengths(mask)  # [B]
    dtype = torch.promote_types(logps.dtype, torch.float32)
    batch, width = mask.shape
    tokens = mask.bool()  # [B, T]
    kept = _value_mask(lengths, width)  # [B, T]

    log_ref_ratio = ((ref_logps.to(dtype) - logps.to(dtype)) * tokens).detach()  # [B, T], 0 on padding
    kl = -log_ref_ratio if kl_estimator == "k1" else torch.expm1(log_ref_ratio) - log_ref_ratio
    rewards = -kl_coef * kl
    score_at = lengths.clamp(max=width - 1)  # [B]
    rewards[torch.arange(batch, device=mask.device), score_at] += scores.to(dtype).detach()
    if whiten_rewards:
        rewards = masked_whiten(rewards, kept, shift_mean=False, reduce=reduce) * kept

    values = values.to(dtype).detach() * kept  # [B, T]
    next_values = torch.cat([values[:, 1:], values.new_zeros(batch, 1)], dim=1)  # [B, T], V_T = 0
    deltas = rewards + gamma * next_values - values  # [B, T]
    advantages = torch.zeros_like(deltas)
    running = deltas.new_zeros(batch)
    for t in reversed(range(width)):
        running = deltas[:, t] + gamma * lam * running
        advantages[:, t] = running
    returns = advantages + values
    advantages = masked_whiten(advantages, tokens, reduce=reduce) * tokens
    return PPORollout(rewards=rewards, advantages=advantages, returns=returns, kl=kl)


@dataclass
class PPOLoss:
    """Loss of one PPO micro-batch and the statistics TRL logs beside it.

    Attributes:
        loss: scalar ``policy_loss + vf_coef * value_loss``.
        policy_loss: scalar clipped surrogate, mean over completion tokens.
        value_loss: scalar clipped value loss, ``½`` the mean over positions ``0 .. n``.
        approx_kl: scalar detached ``½ mean((log π - log π_old)²)`` over the whole ``[B, T]`` block, padding as 0.
        policy_clip_fraction: scalar detached fraction of completion tokens where the clipped surrogate is the larger.
        value_clip_fraction: scalar detached fraction of value positions where the clipped value loss is the larger.
    """

    loss: torch.Tensor
    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    approx_kl: torch.Tensor
    policy_clip_fraction: torch.Tensor
    value_clip_fraction: torch.Tensor


def ppo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange: float = 0.2,
    cliprange_value: float = 0.2,
    vf_coef: float = 0.1,
    cliprange_high: float | None = None,
) -> PPOLoss:
    """Clipped policy and value losses of one micro-batch of a rollout.

    Args:
        logps: ``[B, T]`` log-probability of each completion token under the policy being trained.
        old_logps: ``[B, T]`` the same under the policy that sampled the rollout.
        values: ``[B, T]`` value-model estimates under the model being trained.
        old_values: ``[B, T]`` the estimates of the rollout, the centre of the value clip.
        advantages: ``[B, T]`` from ``ppo_rollout``.
        returns: ``[B, T]`` from ``ppo_rollout``.
        mask: ``[B, T]`` 1 on completion tokens (EOS included), 0 on padding; right-padded.
        cliprange: ε of the policy ratio (its lower side, ``1 - ε``, when ``cliprange_high`` is given).
        cliprange_value: ε_v, how far a value may move from ``old_values`` before its loss is clipped.
        vf_coef: weight of the value loss.
        cliprange_high: upper side of the ratio's clip, ``1 + ε_high``; None: ``cliprange`` (TRL's symmetric clip).

    Returns:
        ``PPOLoss``, in at least fp32 (fp64 inputs stay fp64).

    Raises:
        ValueError: if the mask is not right-padded.
    """
    lengths = _lengths(mask)
    dtype = torch.promote_types(logps.dtype, torch.float32)
    tokens = mask.to(dtype)  # [B, T]
    kept = _value_mask(lengths, mask.size(1)).to(dtype)  # [B, T]
    adv, ret = advantages.to(dtype), returns.to(dtype)

    log_ratio = (logps.to(dtype) - old_logps.to(dtype)) * tokens  # [B, T], 0 on padding
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    high = cliprange if cliprange_high is None else cliprange_high
    clipped = -adv * ratio.clamp(1.0 - cliprange, 1.0 + high)
    policy_loss = (torch.maximum(unclipped, clipped) * tokens).sum() / tokens.sum()

    values = values.to(dtype) * kept
    old_values = old_values.to(dtype)
    values_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    value_err = (values - ret) ** 2
    value_err_clipped = (values_clipped - ret) ** 2
    value_loss = 0.5 * (torch.maximum(value_err, value_err_clipped) * kept).sum() / kept.sum()

    return PPOLoss(
        loss=policy_loss + vf_coef * value_loss,
        policy_loss=policy_loss,
        value_loss=value_loss,
        approx_kl=(0.5 * (log_ratio**2).mean()).detach(),
        policy_clip_fraction=(((clipped > unclipped).to(dtype) * tokens).sum() / tokens.sum()).detach(),
        value_clip_fraction=(((value_err_clipped > value_err).to(dtype) * kept).sum() / kept.sum()).detach(),
    )
