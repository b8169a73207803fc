"""Reasoning RL with verifiable rewards: GRPO (Shao et al. 2024) and its DAPO / Dr. GRPO loss variants.

Each step takes ``train.grad_accum`` micro-batches of ``train.batch_size`` prompts (media + text, with a
checkable ``answer``), samples ``group_size`` completions per prompt with the LMM's own ``generate()``
(the prompt prefilled once and its KV cache shared by the group), scores them with the configured reward
functions (``mmpost.rewards``), normalises the rewards within each group into advantages, and then takes
``iterations`` (μ) optimizer steps on the clipped-ratio objective over those samples, with an optional
k3 KL to the reference (β > 0; β = 0 loads no reference). The log-probs the samples were drawn with are
recomputed once before the first inner step when μ > 1 (with μ = 1 the ratio is 1 by construction).

Departures from the papers, on purpose: no DAPO dynamic sampling (zero-variance groups are counted and,
with ``filter_zero_variance``, left out of the loss and its normaliser instead of re-sampled) and no
overlong-reward shaping; completions cut at ``max_completion_length`` are scored as they are.

Logged per step: loss, reward mean / std (total and per function), accuracy (the ``accuracy`` reward's
mean), completion length, KL, clip fraction, the fraction of zero-variance groups, and the time share of
sampling against optimisation. Held-out accuracy (``data.eval``, greedy answers) as in sft.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from mmpost.config import RunConfig
from mmpost.data.loader import read_source
from mmpost.data.sample import DataError, Sample
from mmpost.losses.grpo import AGGREGATIONS, policy_loss
from mmpost.model.lmm import LMM
from mmpost.rewards import RewardSet
from mmpost.train import Loop, check_bad_fraction, count_batches, finish, start_loop
from mmpost.training.evaluate import to_device
from mmpost.training.parts import set_train_mode
from mmpost.training.reference import Reference, make_reference
from mmpost.training.rollout import Rollout, sample_and_score
from mmpost.training.run import RunContext, build_model, start_run

log = logging.getLogger("mmpost")


class GRPO:
    """Group-relative policy optimisation of connectors and LLM (or LoRA adapters) on prompts with answers.

    Args:
        rewards: reward functions with weights: ``[{name: accuracy, weight: 1.0}, {name: format, weight: 0.2},
            {name: mypkg.rewards.brevity, weight: 0.1, kwargs: {...}}]`` (built-ins, or dotted paths).
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
    """

    def __init__(
        self,
        rewards: list[dict[str, Any]] | None = None,
        group_size: int = 8,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_completion_length: int = 32,
        iterations: int = 1,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        beta: float = 0.0,
        aggregation: str = "grpo",
        scale_rewards: bool = True,
        filter_zero_variance: bool = False,
        share_prefill: bool = True,
    ) -> None:
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"stage.aggregation must be one of {', '.join(AGGREGATIONS)}; got {aggregation!r}")
        if group_size < 2:
            raise ValueError(f"stage.group_size must be at least 2 (advantages compare samples); got {group_size}")
        if iterations < 1 or max_completion_length < 1 or beta < 0 or not 0 < top_p <= 1 or temperature <= 0:
            raise ValueError("stage: need iterations >= 1, max_completion_length >= 1, beta >= 0, 0 < top_p <= 1 "
                             "and temperature > 0")  # fmt: skip
        # resolved now, so a reward path that does not import fails before any model loads
        self.rewards = RewardSet(rewards or [{"name": "accuracy", "weight": 1.0}])
        self.group_size, self.temperature, self.top_p = group_size, temperature, top_p
        self.max_completion_length, self.iterations = max_completion_length, iterations
        self.loss_options = dict(epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta,
                                 aggregation=aggregation, max_completion_length=max_completion_length)  # fmt: skip
        self.beta, self.scale_rewards = beta, scale_rewards
        self.filter_zero_variance, self.share_prefill = filter_zero_variance, share_prefill

    def default_trainable(self, model: LMM) -> list[str]:
        return ["llm.lora" if model.has_lora else "llm"]

    def run(self, cfg: RunConfig, resume: bool = False, allow_changes: bool = False) -> dict[str, Any]:
        samples = read_source(cfg.data.train, "data.train")
        if samples is not None and "accuracy" in self.rewards.names:
            check_answers(samples)
        ctx = start_run(cfg, resume, allow_changes)
        model = build_model(ctx)
        parts = cfg.train.trainable or self.default_trainable(model)
        reference = make_reference(ctx, model, parts) if self.beta > 0 else None
        return self.fit(ctx, model, parts, samples, reference)

    def fit(self, ctx: RunContext, model: LMM, parts: list[str], samples, reference: Reference | None):
        """The loop: sample and score, then μ optimizer steps, per step; log, evaluate, checkpoint."""
        cfg, acc = ctx.cfg, ctx.accelerator
        loop = start_loop(ctx, model, parts, samples, "prompt", updates_per_step=self.iterations)
        state = loop.state
        bar = tqdm(total=loop.total, initial=state["step"], desc="grpo", disable=not acc.is_main_process)
        started = time.perf_counter()
        with loop.stop, bar:
            while state["step"] < loop.total:
                self.step(ctx, model, loop, reference, bar)
        check_bad_fraction(state, cfg.data.max_bad_fraction, [], final=True)
        return finish(ctx, model, state, loop.evals, time.perf_counter() - started, loop.metrics)

    def step(self, ctx: RunContext, model: LMM, loop: Loop, reference: Reference | None, bar) -> None:
        """Samples and scores a step's prompts, takes μ optimizer steps on them, logs, evaluates, checkpoints."""
        acc, t, state = ctx.accelerator, ctx.cfg.train, loop.state
        micro = [next(loop.batches) for _ in range(t.grad_accum)]
        (prompts,) = count_batches(ctx, state, micro, sum(len(b["ids"]) for b in micro))
        if acc.num_processes > 1:
            # a micro-batch that lost every prompt still takes part in the collective forwards and backwards:
            # on a stand-in prompt whose loss mask is all zero (its rollout is left out of the metrics)
            micro = [b if b["ids"] else {**loop.stand_in(), "stand_in": True} for b in micro]
        t0 = time.perf_counter()
        model.eval()
        rollouts = [self.rollout(model, to_device(b, acc.device)) for b in micro if b["ids"]]
        set_train_mode(model)
        t1 = time.perf_counter()
        record = self.optimise(loop, model, rollouts, reference, acc, t, active=prompts > 0)
        t2 = time.perf_counter()
        state["step"] += 1
        step = state["step"]
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", reward=f"{record['reward/mean']:.3f}")
        if step % t.log_every == 0 or step == loop.total:
            loop.metrics.write({"step": step, **record, "lr": loop.scheduler.get_last_lr()[0],
                                "epoch": state["epoch"], "time/sampling_share": (t1 - t0) / (t2 - t0),
                                "time/step_s": t2 - t0, "data/skipped": state["skipped"]})  # fmt: skip
        loop.end_step(ctx, model)

    def rollout(self, model: LMM, batch: dict[str, Any]) -> Rollout:
        rollout = sample_and_score(model, batch, self.rewards, self.group_size, self.max_completion_length,
                                   self.temperature, self.top_p, self.share_prefill, self.scale_rewards)  # fmt: skip
        rollout.counted = not batch.get("stand_in", False)
        return rollout

    def optimise(
        self, loop: Loop, model: LMM, rollouts: list[Rollout], reference, acc, t, active: bool = True
    ) -> dict[str, float]:
        """μ optimizer steps over the step's rollouts; returns the step's metrics (over every process).

        Args:
            active: False when no process has a prompt this step: the schedule advances, nothing is updated.
        """
        g = self.group_size
        masks = []
        for r in rollouts:
            mask = r.labels[:, 1:] != -100  # [P*G, T-1]
            if self.filter_zero_variance:
                mask &= ~r.zero_variance.repeat_interleave(g).unsqueeze(-1)
            masks.append(mask if r.counted else torch.zeros_like(mask))
        # normalisers of the whole generation batch: sequences on this process (DDP averages processes), and
        # tokens over every process divided by their number (the same per-process scale for DAPO)
        sequences = sum(int(m.any(-1).sum()) for m in masks)
        tokens = acc.reduce(torch.tensor(float(sum(int(m.sum()) for m in masks)), device=acc.device), "sum")
        norm = dict(num_sequences=max(sequences, 1), num_tokens=max(float(tokens) / acc.num_processes, 1.0))
        if not active:  # no process has a prompt left to learn from: no update, as in fit
            for _ in range(self.iterations):
                loop.scheduler.step()
            return self.step_metrics([], torch.zeros(3, dtype=torch.float64, device=acc.device), tokens, acc)
        args = [(r.input_ids, r.attention_mask, r.media, r.labels) for r in rollouts]
        old, ref = [None] * len(rollouts), [None] * len(rollouts)
        with torch.no_grad():
            for i, a in enumerate(args):
                if self.iterations > 1:
                    old[i] = model.token_logprobs(*a, media_repeat=g, temperature=self.temperature)
                if reference is not None:
                    ref[i] = reference.token_logprobs(model, *a, media_repeat=g, temperature=self.temperature)
        sums = torch.zeros(3, dtype=torch.float64, device=acc.device)  # loss, kl, clip fraction (token-weighted)
        for iteration in range(self.iterations):
            for i, (a, r, mask) in enumerate(zip(args, rollouts, masks, strict=True)):
                logps = loop.wrapped(*a, media_repeat=g, logprobs=True, temperature=self.temperature)  # [P*G, T-1]
                out = policy_loss(logps, logps.detach() if old[i] is None else old[i], r.advantages, mask.float(),
                                  ref_logps=ref[i], **self.loss_options, **norm)  # fmt: skip
                acc.backward(out.loss)
                if iteration == 0:
                    weight = float(mask.sum())
                    sums += torch.tensor([float(out.loss), float(out.kl) * weight, float(out.clip_fraction) * weight],
                                         dtype=torch.float64, device=acc.device)  # fmt: skip
            if t.max_grad_norm > 0:
                acc.clip_grad_norm_(loop.trainable, t.max_grad_norm)
            loop.optimizer.step()
            loop.scheduler.step()
            loop.optimizer.zero_grad(set_to_none=True)
        return self.step_metrics([r for r in rollouts if r.counted], sums, tokens, acc)

    def step_metrics(self, rollouts: list[Rollout], sums: torch.Tensor, tokens, acc) -> dict[str, float]:
        """Loss, rewards, lengths, KL, clipping and zero-variance groups of a step, over every process."""
        names = self.rewards.names
        local = [torch.cat([r.rewards.float().cpu(), *(r.per_function[n].float().cpu() for n in names)])
                 .view(len(names) + 1, -1) for r in rollouts]  # fmt: skip
        values = torch.cat(local, 1) if local else torch.zeros(len(names) + 1, 0)  # [1 + F, N]
        lengths = torch.cat([r.lengths.float().cpu() for r in rollouts]) if rollouts else torch.zeros(0)
        zero = torch.cat([r.zero_variance.float().cpu() for r in rollouts]) if rollouts else torch.zeros(0)
        gathered = acc.gather_for_metrics(torch.cat([values, lengths[None]], 0).T.contiguous().to(acc.device)).T
        zero = acc.gather_for_metrics(zero.to(acc.device))
        sums = acc.reduce(sums, "sum")
        record = {
            "loss": float(sums[0]) / acc.num_processes,
            "kl": float(sums[1]) / max(float(tokens), 1.0),
            "clip_fraction": float(sums[2]) / max(float(tokens), 1.0),
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
