"""Token-level distillation divergences between a student's and a teacher's next-token distributions.

The caller runs both forward passes, selects the response-token positions and hands over ``[N, V]`` logits (or the
teacher's precomputed top-k, ``TopK``). This module returns one divergence per token; summing and normalising over
tokens, as for cross-entropy, is the caller's.

Both sides' logits are divided by the temperature ``T`` before the softmax and the result is *not* multiplied by
``T²``: this follows GKD (Agarwal et al. 2024) and TRL's ``GKDTrainer``, not Hinton et al.'s classic KD.

- ``forward_kl``: ``KL(p_t || p_s) = Σ p_t (log p_t - log p_s)``, mode-covering, classic KD / SFT on soft labels.
- ``reverse_kl``: ``KL(p_s || p_t)``, mode-seeking, the usual choice for on-policy distillation.
- ``jsd``: GKD's generalised Jensen-Shannon divergence with ``m = β p_t + (1 - β) p_s``,
  ``JSD_β = β KL(p_t || m) + (1 - β) KL(p_s || m)``; β weights the teacher in the mixture. As in TRL
  (``GKDTrainer.generalized_jsd_loss``), the endpoints are special-cased: ``β = 0`` *is* ``forward_kl`` and ``β = 1``
  *is* ``reverse_kl``. The formula itself goes to 0 at both ends (``JSD_β ≈ β KL(p_t || p_s)`` as β → 0 and
  ``≈ (1 - β) KL(p_s || p_t)`` as β → 1), so the loss jumps at the endpoints; the scale of the gradient near them is
  ~β (or ~1 - β) times that of the KL it approaches.

Everything is in log space (``log_softmax``, ``logsumexp`` for the mixture) and terms with zero probability
contribute zero, so underflowing probabilities or ``-inf`` logits give neither NaN nor inf. The teacher is detached:
gradients reach the student only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


@dataclass
class TopK:
    """The teacher's ``k`` most likely next tokens at each position, enough to distil from without its full logits.

    Attributes:
        logprobs: ``[N, k]`` float, ``log_softmax`` of the teacher's raw logits (temperature 1) at those tokens.
        indices: ``[N, k]`` long, their vocabulary ids.
    """

    logprobs: torch.Tensor
    indices: torch.Tensor


def top_k(teacher_logits: torch.Tensor, k: int) -> TopK:
    """The ``k`` largest temperature-1 log-probabilities of each row of ``[N, V]`` logits, largest first.

    Raises:
        ValueError: unless ``1 <= k <= V``.
    """
    vocab = teacher_logits.size(-1)
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, {vocab}] (the vocab size), got {k}")
    dtype = torch.promote_types(teacher_logits.dtype, torch.float32)
    logprobs = F.log_softmax(teacher_logits.detach().to(dtype), dim=-1)  # [N, V]
    values, indices = logprobs.topk(k, dim=-1, largest=True, sorted=True)  # [N, k]
    return TopK(logprobs=values, indices=indices)


def token_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` over the last dim, from log-probabilities; tokens with ``p = 0`` contribute 0 (not 0·inf)."""
    p = log_p.exp()
    diff = torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))
    return (p * diff).sum(dim=-1)


def _divergence(log_s: torch.Tensor, log_t: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """Per-row divergence between student and teacher log-probabilities over the same support."""
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        return token_kl(log_t, log_s)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        return token_kl(log_s, log_t)
    # log m = log(β p_t + (1 - β) p_s), without leaving log space
    log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log1p(-beta)]), dim=0)
    return beta * token_kl(log_t, log_m) + (1.0 - beta) * token_kl(log_s, log_m)


def token_divergence(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | TopK,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Divergence between the student's and the teacher's next-token distributions at each of ``N`` positions.

    Args:
        student_logits: ``[N, V]`` student logits at the selected (response-token) positions.
        teacher: ``[N, V]`` teacher logits at the same positions, or its ``TopK`` there. With ``TopK`` both
            distributions are restricted to the teacher's ``k`` ids and renormalised over them (the teacher's at
            temperature ``T`` is ``log_softmax(logprobs / T)``, which equals its full tempered distribution
            renormalised over those ids); with ``k = V`` this is the full-vocabulary divergence.
        divergence: one of ``DIVERGENCES``.
        beta: weight of the teacher in ``jsd``'s mixture, in ``[0, 1]``; 0 gives ``forward_kl``, 1 ``reverse_kl``.
            Other divergences ignore it.
        temperature: ``T > 0``; both sides' logits are divided by it (no ``T²`` factor, as in GKD).

    Returns:
        ``[N]`` divergence of each position, ``>= 0``, in at least fp32 (fp64 inputs stay fp64).

    Raises:
        ValueError: for an unknown ``divergence``, ``beta`` outside ``[0, 1]``, ``temperature <= 0``, or student and
            teacher shapes that do not match.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; valid: {', '.join(DIVERGENCES)}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")

    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    student = student_logits.to(dtype)  # [N, V]
    vocab = student.size(-1)
    if isinstance(teacher, TopK):
        t_logprobs, indices = teacher.logprobs, teacher.indices  # [N, k]
        if t_logprobs.shape != indices.shape or t_logprobs.shape[:-1] != student.shape[:-1]:
            raise ValueError(
                f"TopK logprobs {tuple(t_logprobs.shape)} and indices {tuple(indices.shape)} must both be "
                f"[N, k] with N matching the student logits {tuple(student.shape)}"
            )
        if indices.size(-1) > vocab:
            raise ValueError(f"TopK has k={indices.size(-1)} ids but the student vocab size is {vocab}")
        student = student.gather(-1, indices)  # [N, k]
        teacher_logits = t_logprobs.detach().to(dtype)  # [N, k], log-probs = logits up to a per-row constant
    else:
        if teacher.shape != student.shape:
            if teacher.shape[:-1] == student.shape[:-1]:
                raise ValueError(f"student and teacher vocab sizes differ: student {vocab}, teacher {teacher.size(-1)}")
            raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ")
        teacher_logits = teacher.detach().to(dtype)  # [N, V]

    log_s = F.log_softmax(student / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    return _divergence(log_s, log_t, divergence, float(beta))
