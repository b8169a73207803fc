"""Reasoning RL with verifiable rewards: GRPO (Shao et al. 2024) and its DAPO / Dr. GRPO loss variants.

Each step takes ``train.grad_accum`` micro-batches of ``train.batch_size`` prompts (media + text, with a
checkable ``answer``), samples ``group_size`` completions per prompt with the LMM's own ``generate()``
(the prompt prefilled once and its KV cache shared by the group), scores them with the configured reward
functions (``mmpost.rewards``), normalises the rewards within each group into advantages, and then takes
``iterations`` (μ) optimizer steps on the clipped-ratio objective over those samples, with an optional
k3 KL to the reference (β > 0; β = 0 loads no reference). The log-probs the samples were drawn with are
recomputed once before the first inner step when μ > 1 (with μ = 1 the ratio is 1 by construction).

The stage is parametric in its ``Objective`` (``objective.py``: how rewards become advantages and the loss they
feed); ``mmpost.stages.rloo`` is this stage with RLOO's objective and options.

Departures from the papers, on purpose: no DAPO dynamic sampling (zero-variance groups are counted and,
with ``filter_zero_variance``, left out of the loss and its normaliser instead of re-sampled) and no
overlong-reward shaping; completions cut at ``max_completion_length`` are scored as they are.

Logged per step: loss, reward mean / std (total and per function), accuracy (the ``accuracy`` reward's
mean), completion length, KL, clip fraction, the fraction of zero-variance groups, and the time share of
sampling against optimisation. Held-out accuracy (``data.eval``, greedy answers) as in sft.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mmpost.config import RunConfig
from mmpost.config.fields import check_values, ranged
from mmpost.data.batches import PromptBatch
from mmpost.data.loader import read_source
from mmpost.data.pipeline import PromptPipeline
from mmpost.data.sample import DataError, Sample
from mmpost.losses.ce import label_logprobs
from mmpost.model.lmm import LMM
from mmpost.rewards import RewardSet
from mmpost.stages.grpo import rollout as sampling
from mmpost.stages.grpo.objective import GroupRelative
from mmpost.stages.grpo.rollout import Rollout
from mmpost.stages.reference import Reference, make_reference
from mmpost.training.context import build_model, start_run
from mmpost.training.evaluate import Evaluator
from mmpost.training.loop import Training, count_batches, start_training, train, training_loader
from mmpost.training.step import BatchLoss, optimizer_step
from mmpost.training.trainable import resolve_parts, set_train_mode

log = logging.getLogger("mmpost")


@dataclass
class SamplingOptions:
    """The options of the stages that sample completions and score them (grpo, rloo); each stage's options class
    documents them with its own."""

    rewards: list[dict[str, Any]] | None = None
    group_size: int = ranged(8, ge=2)
    temperature: float = ranged(1.0, gt=0)
    top_p: float = ranged(1.0, gt=0, le=1)
    max_completion_length: int = ranged(32, ge=1)
    iterations: int = ranged(1, ge=1)
    epsilon_low: float = ranged(0.2, ge=0)
    epsilon_high: float = ranged(0.2, ge=0)
    share_prefill: bool = True
    share_prompt: bool = True

    def __post_init__(self) -> None:
        check_values(self, "stage")


@dataclass
class GRPOOptions(SamplingOptions):
    """``stage: {name: grpo, ...}``.

    Attributes:
        rewards: reward functions with weights: ``[{name: accuracy, weight: 1.0}, {name: format, weight: 0.2},
            {name: mypkg.rewards.brevity, weight: 0.1, kwargs: {...}}]`` (built-ins, or dotted paths), or a trained
            reward model, ``{name: model, path: RUN}`` (``mmpost.rewards``); null means ``[{name: accuracy}]``.
        group_size: G, completions sampled per prompt.
        temperature: sampling temperature (the log-probs of the loss use the same).
        top_p: nucleus sampling threshold.
        max_completion_length: most new tokens per completion.
        iterations: μ, optimizer steps on each batch of samples.
        epsilon_low: lower clip range of the ratio (1 - ε_low).
        epsilon_high: upper clip range of the ratio (1 + ε_high; DAPO's clip-higher uses 0.28).
        beta: weight of the k3 KL to the reference; 0 loads no reference.
        aggregation: ``grpo`` (mean over each sequence's tokens, then over sequences), ``dapo`` (over all
            tokens of the batch) or ``dr_grpo`` (sum divided by sequences x ``max_completion_length``).
        scale_rewards: divide advantages by the group's reward std (off for Dr. GRPO).
        filter_zero_variance: leave groups whose rewards are all equal out of the loss and its normaliser.
        share_prefill: prefill each prompt once for its G samples (off: G-fold prefill, for comparison).
        share_prompt: in the loss forwards (policy, old policy, reference), compute each prompt once for its G
            completions, which attend to it through an attention mask (``mmpost.model.shared_prompt``; same
            log-probs, fewer tokens); with the LLM's ``sdpa`` or ``eager`` attention, else rows are computed whole.
    """

    name: Literal["grpo"] = "grpo"
    beta: float = ranged(0.0, ge=0)
    aggregation: Literal["grpo", "dapo", "dr_grpo"] = "grpo"
    scale_rewards: bool = True
    filter_zero_variance: bool = False


class GRPO:
    """Group-relative policy optimisation of connectors and LLM (or LoRA adapters) on prompts with answers."""

    Options = GRPOOptions
    Objective = GroupRelative  # advantages and loss (``objective.Objective``), built from the options
    trains = ("llm",)  # the LoRA adapters when the model has them

    def __init__(self, options: GRPOOptions) -> None:
        self.options = options
        # resolved now, so a reward path that does not import fails before any model loads
        self.rewards = RewardSet(options.rewards or [{"name": "accuracy", "weight": 1.0}])
        self.objective = self.Objective(options)

    def run(self, cfg: RunConfig, resume: bool = False, allow_changes: bool = False) -> dict[str, Any]:
        samples = read_source(cfg.data.train, "data.train")
        if samples is not None and "accuracy" in self.rewards.names:
            check_answers(samples)
        ctx = start_run(cfg, resume, allow_changes)
        model = build_model(ctx)
        self.rewards.bind(model, ctx.accelerator.device)  # loads a reward model, frozen, next to the policy
        parts = resolve_parts(cfg.train.trainable, self.trains, model)
        reference = make_reference(ctx, model, parts) if self.options.beta > 0 else None
        self.add_heads(model, parts)
        loader = training_loader(ctx, samples, PromptPipeline.for_model(model, cfg.data.max_length))
        training = start_training(ctx, model, parts, loader, Evaluator(ctx, model), self.options.iterations)
        return train(training, lambda training, micro: self.step(training, micro, reference))

    def add_heads(self, model: LMM, parts: list[str]) -> None:
        """Adds the heads the objective trains beside the policy (ppo's value head) before the optimizer is made,
        and checks that ``parts`` train them; grpo and rloo have none."""

    def step(self, training: Training, micro: list[PromptBatch], reference: Reference | None) -> dict[str, Any]:
        """Samples and scores a step's prompts, then takes μ optimizer steps on them."""
        acc = training.accelerator
        (prompts,) = count_batches(training, micro, sum(len(b.ids) for b in micro))
        counted = [not b.empty for b in micro]
        if acc.num_processes > 1:
            # a micro-batch that lost every prompt still takes part in the collective forwards and backwards:
            # on a stand-in prompt whose loss mask is all zero (its rollout is left out of the metrics)
            micro = [training.stand_in() if b.empty else b for b in micro]
        else:
            micro, counted = [b for b in micro if not b.empty], [True] * sum(counted)
        t0 = time.perf_counter()
        training.model.eval()
        with training.sharding.gathered(training.model):  # generation: each process alone on its prompts
            rollouts = self.rollouts(training.model, [b.to(acc.device) for b in micro], counted)
        set_train_mode(training.model)
        t1 = time.perf_counter()
        record = self.optimise(training, rollouts, reference, active=prompts > 0)
        t2 = time.perf_counter()
        return record | {"time/sampling_share": (t1 - t0) / (t2 - t0), "time/step_s": t2 - t0}

    def rollouts(self, model: LMM, micro: list[PromptBatch], counted: list[bool]) -> list[Rollout]:
        """The step's micro-batches sampled (in one ``generate`` call when their inputs stack) and scored."""
        o = self.options
        options = (o.group_size, o.max_completion_length, o.temperature, o.top_p, o.share_prefill)
        merged = sampling.merged_prompts(micro, model.tokenizer.pad_token_id) if len(micro) > 1 else None
        if merged is not None:
            rows = [len(b.input_ids) * o.group_size for b in micro]
            completions = list(sampling.sample(model, *merged, *options).split(rows))
        else:
            completions = [sampling.sample(model, b.input_ids, b.attention_mask, b.media, *options) for b in micro]
        out = []
        for batch, done, real in zip(micro, completions, counted, strict=True):
            rollout = sampling.score(model, batch, done, self.rewards, o.group_size, self.objective.advantages)
            rollout.counted = real
            out.append(rollout)
        return out

    def optimise(
        self, training: Training, rollouts: list[Rollout], reference: Reference | None, active: bool = True
    ) -> dict[str, float]:
        """μ optimizer steps over the step's rollouts; returns the step's metrics (over every process).

        Args:
            active: False when no process has a prompt this step: the schedule advances, nothing is updated.
        """
        acc, g, o = training.accelerator, self.options.group_size, self.options
        masks = []
        for r in rollouts:
            mask = self.objective.loss_mask(r)  # [P*G, T-1]
            masks.append(mask if r.counted else torch.zeros_like(mask))
        # normalisers of the whole generation batch: sequences on this process (DDP averages processes), and
        # tokens over every process divided by their number (the same per-process scale for DAPO)
        sequences = sum(int(m.any(-1).sum()) for m in masks)
        local = [float(sum(int(m.sum()) for m in masks)), float(sequences)]
        counts = acc.reduce(torch.tensor(local, dtype=torch.float64, device=acc.device), "sum")  # tokens, sequences
        norm = dict(num_sequences=max(sequences, 1), num_tokens=max(float(counts[0]) / acc.num_processes, 1.0))
        if not active:  # no process has a prompt left to learn from: no update, as in supervised steps
            for _ in range(o.iterations):
                optimizer_step(training, [], None, 1.0, update=False)
            return self.step_metrics([], torch.zeros(3, dtype=torch.float64, device=acc.device), counts, acc)
        old, ref = [None] * len(rollouts), [None] * len(rollouts)
        with torch.no_grad():
            for i, r in enumerate(rollouts):
                if o.iterations > 1 or self.objective.needs_old_logps:
                    old[i] = self.logprobs(training.model, r)
                if reference is not None:
                    ref[i] = reference.token_logprobs(
                        training.model,
                        r.input_ids,
                        r.attention_mask,
                        r.media,
                        r.labels,
                        media_repeat=g,
                        temperature=o.temperature,
                        share_prompt=o.share_prompt,
                    )
        prepared = self.objective.prepare(rollouts, masks, old, ref, acc)
        # with μ = 1 the ratio is 1 by construction: the loss takes the policy's own detached log-probs
        items = list(zip(rollouts, masks, old if o.iterations > 1 else [None] * len(rollouts), ref, strict=True))
        loss = functools.partial(self.item_loss, norm=norm)
        # μ updates on the same samples; the figures are the first's (the policy the samples were drawn from)
        sums = [optimizer_step(training, items, loss, 1.0, [r.counted for r in rollouts]) for _ in range(o.iterations)]
        figures = sums[0].stats | prepared
        zero = torch.zeros((), dtype=torch.float64, device=acc.device)
        totals = torch.stack([sums[0].loss_sum, figures.get("kl", zero), figures.get("clip", zero)])
        return self.step_metrics([r for r in rollouts if r.counted], totals, counts, acc)

    def logprobs(self, model: torch.nn.Module, r: Rollout) -> torch.Tensor:
        """``[P*G, T-1]`` completion-token log-probs under ``model`` at the sampling temperature."""
        o = self.options
        out = model(r.input_ids, r.attention_mask, r.media, r.labels, o.group_size, share_prompt=o.share_prompt)
        return label_logprobs(out.logits, out.targets, out.kept, o.temperature)

    def item_loss(self, model: torch.nn.Module, item: tuple, norm: dict[str, float]) -> BatchLoss:
        """The objective's loss of one rollout, already normalised by the whole generation batch (``norm``)."""
        r, mask, old, ref = item
        logps = self.logprobs(model, r)  # [P*G, T-1]
        return self.objective.loss(logps, logps.detach() if old is None else old, r, mask, ref, norm)

    def step_metrics(self, rollouts: list[Rollout], sums: torch.Tensor, counts, acc) -> dict[str, float]:
        """Loss, rewards, lengths, KL, clipping and zero-variance groups of a step, over every process.

        Args:
            sums: this process's summed loss, KL and clip figures (float64 ``[3]``).
            counts: completion tokens and sequences of the step over every process (float64 ``[2]``); KL and clip
                fraction are means over the objective's ``per``.
        """
        names = self.rewards.names
        local = [
            torch.cat([r.rewards.float().cpu(), *(r.per_function[n].float().cpu() for n in names)]).view(
                len(names) + 1, -1
            )
            for r in rollouts
        ]
        values = torch.cat(local, 1) if local else torch.zeros(len(names) + 1, 0)  # [1 + F, N]
        lengths = torch.cat([r.lengths.float().cpu() for r in rollouts]) if rollouts else torch.zeros(0)
        zero = torch.cat([r.zero_variance.float().cpu() for r in rollouts]) if rollouts else torch.zeros(0)
        gathered = acc.gather_for_metrics(torch.cat([values, lengths[None]], 0).T.contiguous().to(acc.device)).T
        zero = acc.gather_for_metrics(zero.to(acc.device))
        sums = acc.reduce(sums, "sum")
        units = max(float(counts[0 if self.objective.per == "tokens" else 1]), 1.0)
        record = {
            "loss": float(sums[0]) / acc.num_processes,
            "kl": float(sums[1]) / units,
            "clip_fraction": float(sums[2]) / units,
            "reward/mean": float(gathered[0].mean()),
            "reward/std": float(gathered[0].std()) if gathered.shape[1] > 1 else 0.0,
            "completion_length": float(gathered[-1].mean()),
            "zero_variance_groups": float(zero.mean()) if zero.numel() else 0.0,
        }
        for k, name in enumerate(names, start=1):
            record[f"reward/{name}/mean"] = float(gathered[k].mean())
            record[f"reward/{name}/std"] = float(gathered[k].std()) if gathered.shape[1] > 1 else 0.0
        if "accuracy" in names:
            record["accuracy"] = record["reward/accuracy/mean"]
        return record


def check_answers(samples: list[Sample]) -> None:
    """Fails before any model loads when a JSON prompt has no ``answer`` for the accuracy reward."""
    for sample in samples:
        if sample.meta.get("answer") in (None, ""):
            raise DataError(f"{sample.where()}: the accuracy reward needs an 'answer' field in every prompt")
