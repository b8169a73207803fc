"""Token-level quantities of label-position logits: the summed cross-entropy (the caller divides by the label
tokens of the whole optimizer step) and the label tokens' log-probabilities that preference and RL losses take."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of ``-log softmax(logits)[target]`` over rows.

    Summing rather than averaging lets the training loop divide by the number of label tokens in the
    whole optimizer step (across gradient accumulation and processes), so every token weighs the
    same however the batch was split.

    Args:
        logits: ``[N, V]`` logits at label positions (any float dtype; computed in fp32).
        targets: ``[N]`` target token ids.

    Returns:
        scalar fp32 tensor.
    """
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def label_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, kept: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probabilities of the label tokens, laid out per position.

    Args:
        logits: ``[N, V]`` logits at the kept positions (``TokenLogits.logits``).
        targets: ``[N]`` the tokens they predict.
        kept: ``[B, P]`` bool, which positions the N rows are.
        temperature: the logits are divided by it first (sampling's temperature, for RL ratios).

    Returns:
        ``[B, P]`` float32: entry ``t`` is the log-probability of the token at ``t + 1``, 0 where nothing is kept.
    """
    picked = (logits.float() / temperature).log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return torch.zeros(kept.shape, dtype=picked.dtype, device=picked.device).masked_scatter(kept, picked)
