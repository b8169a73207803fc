"""Kahneman-Tversky optimisation on unpaired examples: each completion is labelled desirable or undesirable alone.

The caller runs the forward passes and hands over each completion's log-probability summed over its tokens, under the
policy and the frozen reference, with its label; and, for the KL baseline, the same summed log-probabilities of
mismatched (prompt, completion) pairs, where each prompt is given another example's completion. This module owns the
arithmetic from there to a per-example loss, the implicit rewards and the baseline that are logged.

With ``r = π - ref``, an example's log-ratio, and ``z0`` the KL baseline:

- ``kto``: KTO (Ethayarajh et al. 2024, eq. 7). ``z0 = max(0, mean(π' - ref'))`` over the mismatched pairs, detached,
  so it shifts the reference point without being trained. A desirable example costs ``λ_D (1 - σ(β (r - z0)))``, an
  undesirable one ``λ_U (1 - σ(β (z0 - r)))``.
- ``apo_zero_unpaired``: the unpaired APO-zero of D'Oosterlinck et al. 2024 (eq. 7 without its pairing), which needs no
  baseline: ``λ_D (1 - σ(β r))`` for desirable examples and ``λ_U σ(β r)`` for undesirable ones, pushing the former
  up and the latter down in absolute terms.

The paper leaves ``λ_D, λ_U`` to be set so that ``λ_D n_D / (λ_U n_U)`` lies in ``[1, 4/3]``; here they are plain
arguments. As TRL's ``KTOTrainer`` does, the baseline is the mean over the whole batch of mismatched pairs, not over
each example's own; with several processes TRL averages the per-process means before clamping, which equals passing
the gathered mismatched log-probabilities of all processes when every process holds as many. The rewards returned for
logging are ``β r``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("kto", "apo_zero_unpaired")


@dataclass
class KTOLoss:
    """Per-example KTO loss, the implicit rewards and the KL baseline.

    Attributes:
        losses: ``[N]`` weighted loss of each example, in the order given; the caller reduces it (usually ``.mean()``).
        rewards: ``[N]`` detached implicit reward ``β (π - ref)`` of each example.
        kl: scalar detached KL baseline ``z0`` (clamped at 0); 0 for ``apo_zero_unpaired``.
    """

    losses: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    policy_kl_logps: torch.Tensor | None = None,
    ref_kl_logps: torch.Tensor | None = None,
    *,
    loss_type: str = "kto",
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLoss:
    """KTO loss of each unpaired example.

    Args:
        policy_logps: ``[N]`` log-probability of each completion under the policy, summed over its tokens.
        ref_logps: ``[N]`` the same under the reference.
        desirable: ``[N]`` bool, true for desirable examples and false for undesirable ones.
        policy_kl_logps: ``[M]`` summed log-probability of each mismatched (prompt, other completion) pair under the
            policy; required by ``kto``, ignored by ``apo_zero_unpaired``.
        ref_kl_logps: ``[M]`` the same under the reference.
        loss_type: one of ``LOSS_TYPES``.
        beta: inverse temperature β; must be positive.
        desirable_weight: ``λ_D``, the weight of desirable examples' losses.
        undesirable_weight: ``λ_U``, the weight of undesirable examples' losses.

    Returns:
        ``KTOLoss``, in at least fp32 (fp64 inputs stay fp64).

    Raises:
        ValueError: for an unknown ``loss_type``, ``beta <= 0``, a negative weight, or ``kto`` without the mismatched
            log-probabilities.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError(f"weights must be >= 0, got {desirable_weight} and {undesirable_weight}")
    if loss_type == "kto" and (policy_kl_logps is None or ref_kl_logps is None):
        raise ValueError("loss_type 'kto' needs policy_kl_logps and ref_kl_logps for its KL baseline")

    dtype = torch.promote_types(policy_logps.dtype, torch.float32)
    log_ratio = policy_logps.to(dtype) - ref_logps.to(dtype)  # [N]
    desirable = desirable.to(device=log_ratio.device, dtype=torch.bool)  # [N]

    if loss_type == "kto":
        kl_ratio = policy_kl_logps.to(dtype) - ref_kl_logps.to(dtype)  # [M]
        # z0 is a reference point, not a target: no gradient flows through it
        kl = kl_ratio.mean().detach().clamp(min=0.0)
        desirable_losses = 1.0 - torch.sigmoid(beta * (log_ratio - kl))
        undesirable_losses = 1.0 - torch.sigmoid(beta * (kl - log_ratio))
    else:  # apo_zero_unpaired
        kl = torch.zeros((), dtype=dtype, device=log_ratio.device)
        desirable_losses = 1.0 - torch.sigmoid(beta * log_ratio)
        undesirable_losses = torch.sigmoid(beta * log_ratio)

    losses = torch.where(desirable, desirable_weight * desirable_losses, undesirable_weight * undesirable_losses)  # [N]
    return KTOLoss(losses=losses, rewards=(beta * log_ratio).detach(), kl=kl)
