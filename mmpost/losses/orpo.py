"""Odds-ratio preference optimisation: the odds-ratio term that ORPO adds to the chosen completion's NLL.

ORPO (Hong et al. 2024) trains without a reference model. With ``P(y|x) = exp(mean_t log π(y_t | x, y_<t))``, the
length-normalised likelihood of a completion (eq. 1), and ``odds(y|x) = P / (1 - P)``, the loss of a pair is

    ``L = L_NLL(chosen) - β log σ(log odds(c) - log odds(r))``                                (eqs. 6, 7)

where ``log odds(y) = ā_y - log(1 - exp(ā_y))`` for the average log-probability ``ā_y``, so that

    ``log_odds = (ā_c - ā_r) - (log(1 - e^ā_c) - log(1 - e^ā_r))``.

This module owns the second term only; the caller adds the NLL. ``log(1 - e^a)`` is computed as ``log(-expm1(a))``
above ``a = -log 2`` and as ``log1p(-e^a)`` below it, each where it loses no precision (Mächler 2012). The rewards
returned for logging are ``β ā``, as TRL's ``ORPOTrainer`` logs them. That trainer takes the NLL as the mean
cross-entropy over every attended token of the chosen sequences, prompt included, and computes this term in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class OddsRatioLoss:
    """Per-pair odds-ratio term and what is logged beside it.

    Attributes:
        losses: ``[N]`` ``-β log σ(log_odds)`` of each pair; the full ORPO loss is the chosen NLL plus its mean.
        chosen_rewards: ``[N]`` detached ``β ā_c``.
        rejected_rewards: ``[N]`` detached ``β ā_r``.
        log_odds: ``[N]`` detached log odds ratio of the chosen over the rejected completion.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    log_odds: torch.Tensor


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - e^x)`` for ``x < 0``, without cancellation near 0 or underflow far below it."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def odds_ratio_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, *, beta: float = 0.1) -> OddsRatioLoss:
    """ORPO's odds-ratio term of each (chosen, rejected) pair.

    Args:
        chosen_logps: ``[N]`` average log-probability per token of each chosen completion under the policy (its
            summed log-probability divided by its token count); must be negative.
        rejected_logps: ``[N]`` the same for the rejected completions.
        beta: weight β of the odds-ratio term (the paper's λ); must be positive.

    Returns:
        ``OddsRatioLoss``, in at least fp32 (fp64 inputs stay fp64).

    Raises:
        ValueError: if ``beta <= 0``.
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    dtype = torch.promote_types(chosen_logps.dtype, torch.float32)
    avg_c, avg_r = chosen_logps.to(dtype), rejected_logps.to(dtype)  # [N]
    log_odds = (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))  # [N]
    return OddsRatioLoss(
        losses=-beta * F.logsigmoid(log_odds),
        chosen_rewards=(beta * avg_c).detach(),
        rejected_rewards=(beta * avg_r).detach(),
        log_odds=log_odds.detach(),
    )
