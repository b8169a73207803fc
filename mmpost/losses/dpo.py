"""Pairwise preference losses on sequence log-probabilities: DPO, conservative DPO, IPO, hinge and SimPO.

The caller runs the forward passes and hands over each completion's log-probability summed over its tokens, under
the policy and (except for SimPO) under the frozen reference, plus the completion token counts. This module owns
only the arithmetic from there to a per-pair loss and the implicit rewards that are logged.

With ``Δ = (π_c - ref_c) - (π_r - ref_r)``, the margin of the chosen over the rejected completion:

- ``sigmoid``: DPO (Rafailov et al. 2023), ``-log σ(βΔ)``. With ``label_smoothing = ε > 0`` it is conservative DPO
  (cDPO, Mitchell 2023): the label is taken to be wrong with probability ε, giving
  ``-(1 - ε) log σ(βΔ) - ε log σ(-βΔ)``.
- ``ipo``: IPO (Azar et al. 2023, eq. 17), ``(Δ - 1/(2β))²``. Departs from the paper's formula: each side's log-ratio
  is divided by its completion token count before taking the difference, so that β means the same thing whatever
  the completion lengths (the IPO authors' own runs were normalised this way; TRL does the same).
- ``hinge``: ``relu(1 - βΔ)``, the hinge of SLiC / RSO (Zhao et al. 2023; Liu et al. 2023) on the DPO margin.
- ``simpo``: SimPO (Meng et al. 2024), reference-free, on length-normalised log-probabilities
  ``Δ = π_c/|c| - π_r/|r|`` with a target margin γ: ``-log σ(βΔ - γ)``; ``label_smoothing`` applies as in cDPO.

The rewards returned for logging are ``β (π - ref)`` per side (summed, also for IPO) and ``β π / |len|`` for SimPO.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo")


@dataclass
class PreferenceLoss:
    """Per-pair preference loss and the implicit rewards of both sides.

    Attributes:
        losses: ``[N]`` loss of each pair; the caller reduces it (usually ``.mean()``).
        chosen_rewards: ``[N]`` detached implicit reward of the chosen completion.
        rejected_rewards: ``[N]`` detached implicit reward of the rejected completion.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def _smoothed_logistic(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``-(1 - ε) log σ(x) - ε log σ(-x)``: logistic loss with a label that is wrong with probability ε."""
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> PreferenceLoss:
    """Preference loss of each (chosen, rejected) pair.

    Args:
        policy_chosen: ``[N]`` log-probability of each chosen completion under the policy, summed over its tokens.
        policy_rejected: ``[N]`` the same for the rejected completions.
        ref_chosen: ``[N]`` summed log-probability of the chosen completions under the reference; ignored (and may
            be ``None``) for ``simpo``.
        ref_rejected: ``[N]`` the same for the rejected completions.
        chosen_tokens: ``[N]`` number of tokens in each chosen completion (used by ``ipo`` and ``simpo``; counts
            below 1 are taken as 1).
        rejected_tokens: ``[N]`` number of tokens in each rejected completion.
        loss_type: one of ``LOSS_TYPES``.
        beta: inverse temperature β of the margin (the regularisation τ of IPO); must be positive.
        label_smoothing: probability ε that a label is flipped, in ``[0, 0.5)``; only ``sigmoid`` (cDPO) and
            ``simpo`` use it.
        simpo_gamma: SimPO's target reward margin γ.

    Returns:
        ``PreferenceLoss`` with per-pair losses and detached rewards, in at least fp32 (fp64 inputs stay fp64).

    Raises:
        ValueError: for an unknown ``loss_type``, a missing reference with a reference-based type, ``beta <= 0``,
            ``label_smoothing`` outside ``[0, 0.5)``, or ``label_smoothing > 0`` with ``ipo`` or ``hinge``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing > 0 and loss_type in ("ipo", "hinge"):
        raise ValueError(f"label_smoothing applies to 'sigmoid' and 'simpo' only, not {loss_type!r}")
    if loss_type != "simpo" and (ref_chosen is None or ref_rejected is None):
        raise ValueError(f"loss_type {loss_type!r} needs ref_chosen and ref_rejected; only 'simpo' is reference-free")

    dtype = torch.promote_types(policy_chosen.dtype, torch.float32)
    pi_c, pi_r = policy_chosen.to(dtype), policy_rejected.to(dtype)  # [N]
    len_c = chosen_tokens.to(dtype).clamp(min=1.0)  # [N]
    len_r = rejected_tokens.to(dtype).clamp(min=1.0)  # [N]

    if loss_type == "simpo":
        avg_c, avg_r = pi_c / len_c, pi_r / len_r  # [N]
        losses = _smoothed_logistic(beta * (avg_c - avg_r) - simpo_gamma, label_smoothing)
        return PreferenceLoss(losses, (beta * avg_c).detach(), (beta * avg_r).detach())

    ratio_c = pi_c - ref_chosen.to(dtype)  # [N] log π/ref of the chosen completion
    ratio_r = pi_r - ref_rejected.to(dtype)  # [N]
    if loss_type == "sigmoid":
        losses = _smoothed_logistic(beta * (ratio_c - ratio_r), label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * (ratio_c - ratio_r))
    else:  # ipo
        losses = (ratio_c / len_c - ratio_r / len_r - 1.0 / (2.0 * beta)) ** 2
    return PreferenceLoss(losses, (beta * ratio_c).detach(), (beta * ratio_r).detach())
