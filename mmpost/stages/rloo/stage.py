"""REINFORCE leave-one-out (Ahmadian et al. 2024) as TRL 1.16's ``RLOOTrainer`` computes it.

The grpo stage with another objective (``mmpost.stages.grpo.objective``): the same sampling of ``k``
(``group_size``) completions per prompt with the LMM's shared-prefill ``generate()``, the same reward functions, μ
updates per batch of samples and the same logging. What differs is ``LeaveOneOut``:

- the KL to the reference is not a loss term but a penalty on the reward of the whole sequence,
  ``R = r - β Σ_t (log π_old - log π_ref)`` (k1, with the sampling policy's log-probs, computed once before the first
  update; so it may be negative), taken before the baseline;
- each completion's baseline is the mean penalised reward of the other ``k - 1`` of its prompt;
- with ``normalize_advantages`` the advantages are standardised over the whole generation batch (every micro-batch of
  the step, on every process), not per group;
- the loss clips the ratio of whole-sequence probabilities and averages over sequences (``mmpost.losses.rloo``).

Where this departs from TRL: with μ = 1 the ratio is 1 by construction (the policy's own detached log-probs), where
TRL divides by log-probs from a separate forward of the same weights (equal up to rounding). Logged: what grpo logs,
with ``kl`` the mean over sequences of the summed log-ratio used in the reward (TRL logs it per token) and
``clip_fraction`` over sequences; ``zero_variance_groups`` counts groups whose penalised rewards are all equal, as
TRL's ``frac_reward_zero_std`` does. As with any leave-one-out baseline, the logged loss of the first update is 0 up
to rounding (the advantages of a group sum to 0); its gradient is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mmpost.config.fields import ranged
from mmpost.interfaces import IGNORE
from mmpost.losses.rloo import rloo_advantages, rloo_loss, sequence_kl
from mmpost.stages.grpo.rollout import Rollout
from mmpost.stages.grpo.stage import GRPO, SamplingOptions
from mmpost.training.step import BatchLoss

NORMALIZE_EPS = 1e-4  # TRL's, added to the batch std


@dataclass
class RLOOOptions(SamplingOptions):
    """``stage: {name: rloo, ...}``.

    Attributes:
        rewards: reward functions with weights, as grpo's: ``[{name: accuracy, weight: 1.0}, {name: format,
            weight: 0.2}, {name: mypkg.rewards.brevity, weight: 0.1, kwargs: {...}}]`` (built-ins, or dotted paths),
            or a trained reward model, ``{name: model, path: RUN}``; null means ``[{name: accuracy}]``.
        group_size: k, completions sampled per prompt; each one's baseline is the mean reward of the other k - 1.
        temperature: sampling temperature (the log-probs of the loss and of the KL use the same).
        top_p: nucleus sampling threshold.
        max_completion_length: most new tokens per completion.
        iterations: μ, optimizer steps on each batch of samples (the advantages are formed once, before the first).
        epsilon_low: lower clip range of the sequence ratio (1 - ε_low).
        epsilon_high: upper clip range of the sequence ratio (1 + ε_high).
        beta: weight of the KL penalty taken from each sequence's reward before the baseline, β Σ_t (log π_old -
            log π_ref); 0 loads no reference (TRL's default 0.05).
        normalize_advantages: standardise the advantages over the whole generation batch (every micro-batch and
            process of the step), (A - mean) / (std + 1e-4) with the unbiased std, as TRL's flag.
        share_prefill: prefill each prompt once for its k samples (off: k-fold prefill, for comparison).
        share_prompt: in the loss forwards (policy, old policy, reference), compute each prompt once for its k
            completions, which attend to it through an attention mask (``mmpost.model.shared_prompt``; same
            log-probs, fewer tokens); with the LLM's ``sdpa`` or ``eager`` attention, else rows are computed whole.
    """

    name: Literal["rloo"] = "rloo"
    beta: float = ranged(0.05, ge=0)
    normalize_advantages: bool = False


class LeaveOneOut:
    """RLOO's objective: leave-one-out advantages of KL-penalised rewards, the clipped sequence-level ratio."""

    per = "sequences"

    def __init__(self, options: RLOOOptions) -> None:
        self.options = options
        self.needs_old_logps = options.beta > 0  # the KL penalty is the sampling policy's

    def advantages(self, rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return rloo_advantages(rewards, group_size)  # before the KL penalty: ``prepare`` settles them

    def loss_mask(self, rollout: Rollout) -> torch.Tensor:
        return rollout.labels[:, 1:] != IGNORE  # [P*k, T-1]

    def prepare(self, rollouts, masks, old, ref, acc) -> dict[str, torch.Tensor]:
        o = self.options
        kl_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
        for r, mask, old_logps, ref_logps in zip(rollouts, masks, old, ref, strict=True):
            kl = sequence_kl(old_logps, ref_logps, mask) if o.beta > 0 else None  # [P*k]
            r.advantages, r.zero_variance = rloo_advantages(r.rewards, o.group_size, kl=kl, beta=o.beta)
            if kl is not None and r.counted:
                kl_sum += kl.double().sum()
        if o.normalize_advantages:
            standardise(rollouts, acc)
        return {"kl": kl_sum}

    def loss(self, logps, old_logps, rollout, mask, ref_logps, norm) -> BatchLoss:
        o = self.options
        out = rloo_loss(
            logps,
            old_logps,
            rollout.advantages,
            mask.float(),
            epsilon_low=o.epsilon_low,
            epsilon_high=o.epsilon_high,
            num_sequences=norm["num_sequences"],
        )
        rows = int(mask.any(-1).sum())
        return BatchLoss(out.loss, rows, {"clip": out.clip_fraction.detach().double() * rows})


def standardise(rollouts: list[Rollout], acc) -> None:
    """Standardises the counted rollouts' advantages over every process, with the unbiased std plus
    ``NORMALIZE_EPS`` (the two passes of ``rloo_advantages(normalize=True)``, reduced across processes)."""
    counted = [r.advantages.double() for r in rollouts if r.counted]
    values = torch.cat(counted) if counted else torch.zeros(0, dtype=torch.float64, device=acc.device)
    count, total = acc.reduce(torch.stack([values.new_tensor(float(values.numel())), values.sum()]), "sum")
    mean = total / count.clamp(min=1.0)
    squares = acc.reduce(((values - mean) ** 2).sum(), "sum")
    std = (squares / (count - 1).clamp(min=1.0)).sqrt()
    for r in rollouts:
        r.advantages = ((r.advantages.double() - mean) / (std + NORMALIZE_EPS)).to(r.advantages.dtype)


class RLOO(GRPO):
    """REINFORCE leave-one-out of connectors and LLM (or LoRA adapters) on prompts with answers, as TRL's RLOO."""

    Options = RLOOOptions
    Objective = LeaveOneOut
