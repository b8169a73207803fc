"""What the stages built on GRPO's sampling differ in: how rewards become advantages and which loss those feed.

The grpo stage (``stage.py``) samples and scores a step's completions, computes the log-probs its objective needs
(the sampling policy's, the reference's) and takes μ updates; an ``Objective`` supplies the rest. GRPO's own,
``GroupRelative``, is here; RLOO's leave-one-out objective is ``mmpost.stages.rloo.LeaveOneOut``.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch

from mmpost.interfaces import IGNORE
from mmpost.losses.grpo import group_advantages, policy_loss
from mmpost.stages.grpo.rollout import Rollout
from mmpost.training.step import BatchLoss


class Objective(Protocol):
    """Advantages and loss of a policy-gradient stage on sampled groups.

    Attributes:
        per: what the logged ``kl`` and ``clip_fraction`` are means over (``tokens`` or ``sequences``).
        needs_old_logps: the sampling policy's log-probs are needed even with μ = 1 (before the first update).
    """

    per: Literal["tokens", "sequences"]
    needs_old_logps: bool

    def advantages(self, rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(advantages [P*G], zero_variance [P])`` of a micro-batch's rewards, when it is scored."""

    def loss_mask(self, rollout: Rollout) -> torch.Tensor:
        """``[P*G, T-1]`` bool: the completion tokens that enter the loss."""

    def prepare(
        self,
        rollouts: list[Rollout],
        masks: list[torch.Tensor],
        old: list[torch.Tensor | None],
        ref: list[torch.Tensor | None],
        acc,
    ) -> dict[str, torch.Tensor]:
        """Settles the rollouts' advantages before the first update (every process calls it together); returns
        figures summed over this process's counted rollouts (``kl``), float64 scalars."""

    def loss(
        self,
        logps: torch.Tensor,
        old_logps: torch.Tensor,
        rollout: Rollout,
        mask: torch.Tensor,
        ref_logps: torch.Tensor | None,
        norm: dict[str, float],
    ) -> BatchLoss:
        """The loss of one rollout, already normalised by the whole generation batch (``norm``: ``num_sequences``
        on this process, ``num_tokens`` per process); ``stats`` summed as the figures of ``per``."""


class GroupRelative:
    """GRPO's objective: group-normalised advantages at scoring, the clipped token-level ratio plus k3 KL."""

    per = "tokens"
    needs_old_logps = False

    def __init__(self, options) -> None:
        self.options = options
        self.loss_options = dict(
            epsilon_low=options.epsilon_low,
            epsilon_high=options.epsilon_high,
            beta=options.beta,
            aggregation=options.aggregation,
            max_completion_length=options.max_completion_length,
        )

    def advantages(self, rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return group_advantages(rewards, group_size, scale=self.options.scale_rewards)

    def loss_mask(self, rollout: Rollout) -> torch.Tensor:
        mask = rollout.labels[:, 1:] != IGNORE  # [P*G, T-1]
        if self.options.filter_zero_variance:
            mask &= ~rollout.zero_variance.repeat_interleave(self.options.group_size).unsqueeze(-1)
        return mask

    def prepare(self, rollouts, masks, old, ref, acc) -> dict[str, torch.Tensor]:
        return {}  # the advantages were formed at scoring; the KL is a loss term

    def loss(self, logps, old_logps, rollout, mask, ref_logps, norm) -> BatchLoss:
        out = policy_loss(
            logps, old_logps, rollout.advantages, mask.float(), ref_logps=ref_logps, **self.loss_options, **norm
        )
        weight = float(mask.sum())
        figures = {"kl": float(out.kl) * weight, "clip": float(out.clip_fraction) * weight}
        stats = {k: torch.tensor(v, dtype=torch.float64, device=out.loss.device) for k, v in figures.items()}
        return BatchLoss(out.loss, int(weight), stats)
