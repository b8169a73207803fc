"""RLHF with PPO (Schulman et al. 2017; Ziegler et al. 2019; Stiennon et al. 2020): a learned value, GAE advantages,
the clipped policy and value losses, and a per-token KL penalty to the reference.

The grpo stage's sampling (``mmpost.stages.grpo``: the LMM's shared-prefill ``generate()``, the step's prompts in one
call, the reward functions) with PPO's objective in place of the group-relative one:

- each completion's score is the weighted sum of the configured rewards; a trained reward model is one of them
  (``rewards: [{name: model, path: RUN}]``, ``mmpost.rewards``), the verifiable ones can be added to it;
  ``missing_eos_penalty`` is taken from the score of a completion that ends without end-of-sequence;
- before the first update the sampling policy's log-probs and values and the reference's log-probs are computed
  once (no gradients); ``mmpost.losses.ppo.ppo_rollout`` turns them and the scores into per-token rewards (the
  KL penalty ``-β KL_t``, k1 or k3, with the score one past the last token), GAE advantages (γ, λ), returns, and
  whitens the advantages over every completion token of the step, on every process;
- ``iterations`` (μ, TRL's ``num_ppo_epochs``) optimizer steps follow, each over every micro-batch of the step
  (TRL's ``num_mini_batches: 1``), on ``mmpost.losses.ppo.ppo_loss``: the clipped surrogate plus ``vf_coef`` times
  the clipped value loss, each micro-batch's loss the mean over its own tokens and the step's the mean over its
  micro-batches, as TRL's gradient accumulation gives.

The value is a head on the policy's own trunk by default (``value_model: shared``, ``mmpost.model.heads``): one
forward gives the log-probs and the values, and the value loss also trains the trunk (weighted by ``vf_coef``).
``value_model: separate`` gives the critic a decoder of its own, a copy of the starting LLM's, reading the policy's
input embeddings without training them (``mmpost.model.heads.CriticTrunk``). Either is added (fresh) when the run
starts, trains as the part ``heads`` beside the LLM (or its LoRA adapters), and is saved with the model. The
reference is the starting policy: a frozen copy, or the policy with its LoRA adapters off
(``mmpost.stages.reference``); ``beta: 0`` loads none.

Where this departs from TRL 1.9's ``PPOTrainer`` (since removed from TRL): TRL's value model is a separate model by
default, initialised from the reward model, with embeddings of its own; here it shares the trunk, or (separate) the
input embeddings and media tokens, and starts from the policy. The policy and value forwards compute each row
whole (the shared-prompt forward of grpo is used by the reference only). Whitening is over the step's completions
on every process (TRL's is over each process's own).

Logged per step: what grpo logs (``kl``: the mean over completions of the summed per-token KL, TRL's
``objective/kl``; ``clip_fraction``: the policy's, over tokens, averaged over micro-batches), ``score`` (the mean
score after the EOS penalty), ``policy_loss``, ``value_loss``, ``value_clip_fraction``, ``approx_kl`` and
``value/mean``; held-out accuracy (``data.eval``, greedy answers) as in sft.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mmpost.config.fields import ranged
from mmpost.interfaces import IGNORE
from mmpost.losses.ce import label_logprobs
from mmpost.losses.ppo import ppo_loss, ppo_rollout
from mmpost.model.completions import eos_token_ids
from mmpost.model.heads import add_head
from mmpost.model.lmm import LMM
from mmpost.stages.grpo.rollout import Rollout
from mmpost.stages.grpo.stage import GRPO, SamplingOptions
from mmpost.training.loop import Training
from mmpost.training.step import BatchLoss, optimizer_step
from mmpost.training.trainable import PartError


@dataclass
class PPOOptions(SamplingOptions):
    """``stage: {name: ppo, ...}``.

    Attributes:
        rewards: reward functions with weights, as grpo's; a trained reward model is ``{name: model, path: RUN}``
            (the ``rm`` stage's run); null means ``[{name: accuracy}]``.
        group_size: completions sampled per prompt (1, as in TRL's PPO; more share each prompt's prefill).
        temperature: sampling temperature (the log-probs of the loss and of the KL use the same).
        top_p: nucleus sampling threshold.
        max_completion_length: most new tokens per completion.
        iterations: μ, TRL's ``num_ppo_epochs``: optimizer steps on each batch of samples, each over all of them.
        epsilon_low: lower clip range of the policy ratio (1 - ε_low; TRL's ``cliprange``).
        epsilon_high: upper clip range of the policy ratio (1 + ε_high).
        beta: weight of the per-token KL penalty in the rewards (TRL's ``kl_coef``); 0 loads no reference.
        kl_estimator: ``k1`` (log π_old - log π_ref) or ``k3`` (e^x - 1 - x, x = log π_ref - log π_old).
        gamma: discount γ of GAE.
        lam: GAE's λ.
        cliprange_value: how far a value may move from the rollout's before its loss is clipped (ε_v).
        vf_coef: weight of the value loss.
        whiten_rewards: rescale the per-token rewards to unit std (keeping their mean) before GAE.
        missing_eos_penalty: taken from the score of a completion without end-of-sequence; null: none.
        value_model: ``shared``: the value is a head on the policy's trunk, and the value loss also trains the
            trunk; ``separate``: a critic of its own, a copy of the starting LLM's decoder with the head, reading the
            policy's input embeddings without training them (``mmpost.model.heads.CriticTrunk``; a second
            decoder's memory, and the media encoded twice per forward).
        share_prefill: prefill each prompt once for its samples.
        share_prompt: the reference's forwards compute each prompt once for its samples (``group_size`` > 1).
    """

    name: Literal["ppo"] = "ppo"
    group_size: int = ranged(1, ge=1)
    iterations: int = ranged(4, ge=1)
    beta: float = ranged(0.05, ge=0)
    kl_estimator: Literal["k1", "k3"] = "k1"
    gamma: float = ranged(1.0, ge=0, le=1)
    lam: float = ranged(0.95, ge=0, le=1)
    cliprange_value: float = ranged(0.2, ge=0)
    vf_coef: float = ranged(0.1, ge=0)
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = None
    value_model: Literal["shared", "separate"] = "shared"


class Unused:
    """PPO's advantages come from GAE once the values are known (``PPO.optimise``), not at scoring."""

    per = "sequences"
    needs_old_logps = True

    def __init__(self, options: PPOOptions) -> None:
        self.options = options

    def advantages(self, rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros_like(rewards), torch.zeros(rewards.numel() // group_size, dtype=torch.bool)


@dataclass
class Columns:
    """A rollout's completion columns, right-padded to ``L`` (the step's longest completion): entry ``t`` is about
    completion token ``t``."""

    logps: torch.Tensor  # [B, L] log-prob of token t under the sampling policy
    values: torch.Tensor  # [B, L] the value of the text before token t
    ref_logps: torch.Tensor  # [B, L]
    mask: torch.Tensor  # [B, L] 1 on completion tokens, EOS included


def completion_columns(full: torch.Tensor, r: Rollout) -> torch.Tensor:
    """``[B, L]`` the entries of a per-position tensor (``[B, T-1]`` next-token log-probs or ``[B, T]`` values)
    read at the position before each completion token: entry ``t`` is about completion token ``t``."""
    start = r.prompt_width - 1
    return full[:, start : start + r.input_ids.shape[1] - r.prompt_width]


class PPO(GRPO):
    """PPO with a value head on the policy's trunk, rewards from a reward model and / or the reward registry."""

    Options = PPOOptions
    Objective = Unused
    trains = ("llm", "heads")  # the LoRA adapters and the value head when the model has adapters

    def add_heads(self, model: LMM, parts: list[str]) -> None:
        if not {"heads", "heads.value"} & set(parts):
            raise PartError(f"ppo trains a value head: add 'heads' to train.trainable (it is {parts})")
        add_head(model, "value", trunk=self.options.value_model == "separate")  # a resumed checkpoint has it

    def forward(self, model: torch.nn.Module, r: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, L] completion log-probs, [B, L] values)`` under ``model``, from one forward with the value head."""
        out = model(r.input_ids, r.attention_mask, r.media, r.labels, self.options.group_size, head="value")
        logps = label_logprobs(out.logits, out.targets, out.kept, self.options.temperature)  # [B, T-1]
        return completion_columns(logps, r), completion_columns(out.values, r)

    def scores(self, r: Rollout, eos: set[int]) -> torch.Tensor:
        """``[B]`` the rollout's scores, less ``missing_eos_penalty`` where a completion has no end-of-sequence."""
        scores = r.rewards.float()
        penalty = self.options.missing_eos_penalty
        if penalty is not None:
            tokens = r.input_ids[:, r.prompt_width :]
            mask = r.labels[:, r.prompt_width :] != IGNORE
            ended = (torch.isin(tokens, torch.tensor(sorted(eos), device=tokens.device)) & mask).any(-1)
            scores = scores - penalty * (~ended).float()
        return scores

    def optimise(self, training: Training, rollouts: list[Rollout], reference, active: bool = True) -> dict:
        acc, o = training.accelerator, self.options
        masks = [(r.labels[:, r.prompt_width :] != IGNORE) & r.counted for r in rollouts]  # [B, L] each
        sequences = sum(int(m.any(-1).sum()) for m in masks)
        local = [float(sum(int(m.sum()) for m in masks)), float(sequences)]
        counts = acc.reduce(torch.tensor(local, dtype=torch.float64, device=acc.device), "sum")
        if not active:
            for _ in range(o.iterations):
                optimizer_step(training, [], None, 1.0, update=False)
            return self.step_metrics([], torch.zeros(3, dtype=torch.float64, device=acc.device), counts, acc)
        eos = eos_token_ids(acc.unwrap_model(training.model))
        columns = []
        with torch.no_grad():
            for r, mask in zip(rollouts, masks, strict=True):
                logps, values = self.forward(training.model, r)
                ref = logps
                if reference is not None:
                    ref = reference.token_logprobs(
                        training.model,
                        r.input_ids,
                        r.attention_mask,
                        r.media,
                        r.labels,
                        media_repeat=o.group_size,
                        temperature=o.temperature,
                        share_prompt=o.share_prompt,
                    )
                    ref = completion_columns(ref, r)
                columns.append(Columns(logps, values, ref, mask.long()))
        targets = self.gae(columns, [self.scores(r, eos) for r in rollouts], acc)
        items = list(zip(rollouts, columns, targets, strict=True))

        def loss(model: torch.nn.Module, item) -> BatchLoss:
            return self.item_loss(model, item, len(items))

        sums = [optimizer_step(training, items, loss, 1.0, [r.counted for r in rollouts]) for _ in range(o.iterations)]
        first = sums[0]
        zero = torch.zeros((), dtype=torch.float64, device=acc.device)
        kl = sum((t["kl"].double().sum() for t, r in zip(targets, rollouts, strict=True) if r.counted), zero)
        totals = torch.stack([first.loss_sum, kl, first.stats.get("clip", zero)])
        counted = [r for r in rollouts if r.counted]
        record = self.step_metrics(counted, totals, counts, acc)
        # the clip figure is a mean over micro-batches, each a fraction of its tokens (TRL's), not over sequences
        extra = torch.stack([first.stats.get(k, zero) for k in ("clip", *EXTRA)])
        scores = [self.scores(r, eos).double() for r in counted]
        score = torch.stack([sum((s.sum() for s in scores), zero), zero + sum(s.numel() for s in scores)])
        micro = acc.reduce(zero + len(counted), "sum").clamp(min=1.0)
        extra, score = acc.reduce(extra, "sum") / micro, acc.reduce(score, "sum")
        record["clip_fraction"] = float(extra[0])
        record |= {name: float(v) for name, v in zip(EXTRA, extra[1:], strict=True)}
        record["score"] = float(score[0] / score[1].clamp(min=1.0))
        return record

    def gae(self, columns: list[Columns], scores: list[torch.Tensor], acc) -> list[dict]:
        """Advantages, returns and per-token KL of the step's rollouts as ``[B, L]`` tensors per rollout, from one
        ``ppo_rollout`` over all of them padded to the longest completion, whitened over every completion token of
        the step on every process (so that two processes train as one with the same global batch; a stand-in's
        rows have no tokens and count for nothing)."""
        o = self.options
        width = max(c.mask.shape[1] for c in columns)

        def stacked(field: str) -> torch.Tensor:
            pad = torch.nn.functional.pad
            return torch.cat([pad(getattr(c, field), (0, width - c.mask.shape[1])) for c in columns])

        out = ppo_rollout(
            stacked("logps"),
            stacked("ref_logps"),
            stacked("values"),
            torch.cat(scores),
            stacked("mask"),
            kl_coef=o.beta,
            kl_estimator=o.kl_estimator,
            gamma=o.gamma,
            lam=o.lam,
            whiten_rewards=o.whiten_rewards,
            reduce=lambda t: acc.reduce(t, "sum"),
        )
        rows = [c.mask.shape[0] for c in columns]
        split = zip(columns, out.advantages.split(rows), out.returns.split(rows), out.kl.split(rows), strict=True)
        return [
            {"advantages": a[:, : c.mask.shape[1]], "returns": ret[:, : c.mask.shape[1]], "kl": kl}
            for c, a, ret, kl in split
        ]

    def item_loss(self, model: torch.nn.Module, item: tuple, micro_batches: int) -> BatchLoss:
        """PPO's loss of one rollout: the mean over its tokens, divided by the step's micro-batches."""
        r, c, target = item
        logps, values = self.forward(model, r)
        if not r.counted:  # a stand-in: joins the collective backward with a zero loss
            return BatchLoss(logps.sum() * 0 + values.sum() * 0, 0, {})
        o = self.options
        out = ppo_loss(
            logps,
            c.logps,
            values,
            c.values,
            target["advantages"],
            target["returns"],
            c.mask,
            cliprange=o.epsilon_low,
            cliprange_high=o.epsilon_high,
            cliprange_value=o.cliprange_value,
            vf_coef=o.vf_coef,
        )
        stats = {
            "clip": out.policy_clip_fraction,
            "policy_loss": out.policy_loss.detach(),
            "value_loss": out.value_loss.detach(),
            "value_clip_fraction": out.value_clip_fraction,
            "approx_kl": out.approx_kl,
            "value/mean": (values.detach() * c.mask).sum() / c.mask.sum(),
        }
        return BatchLoss(out.loss / micro_batches, int(c.mask.any(-1).sum()), stats)


EXTRA = ("policy_loss", "value_loss", "value_clip_fraction", "approx_kl", "value/mean")
