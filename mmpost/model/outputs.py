"""What the LMM's forward returns, in a module of its own so that the pieces computing it need not import the
LMM."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenLogits:
    """What ``LMM.forward`` returns: next-token logits at the positions a caller needs, and what they predict.

    With labels, the positions are those that predict a label token (position ``t`` predicts token ``t + 1``), so
    the largest tensor of a training step holds only those rows; without labels, every position.

    Attributes:
        logits: ``[N, V]`` one row per kept position, row-major over the batch.
        kept: ``[B, P]`` bool, which positions the rows are (``P = T - 1`` with labels, ``T`` without).
        targets: ``[N]`` the label token each row predicts; None without labels.
        values: ``[B, T]`` fp32 values of the head the forward was asked for (``mmpost.model.heads``), at every
            position; None without one. A forward with a head and no labels computes no logits (None).
        cross_entropy: scalar fp32, the label tokens' summed cross-entropy, from a forward asked for it instead of
            the logits (then None).
    """

    logits: torch.Tensor | None
    kept: torch.Tensor
    targets: torch.Tensor | None = None
    values: torch.Tensor | None = None
    cross_entropy: torch.Tensor | None = None

    def dense(self) -> torch.Tensor:
        """``[B, P, V]`` logits of a forward without labels (every position kept)."""
        return self.logits.reshape(*self.kept.shape, self.logits.shape[-1])
