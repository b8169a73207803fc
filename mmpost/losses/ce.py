"""Token cross-entropy, summed (the caller divides by the label tokens of the whole optimizer step)."""

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
