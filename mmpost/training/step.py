"""The optimizer step every stage's step goes through, and the step of conversation and preference stages.

``optimizer_step`` runs forward and backward per micro-batch (gradient synchronisation on the last only), clips,
steps the optimizer and the schedule. ``supervised_step(loss)`` is one such update on the micro-batches' summed
loss divided by its units (label tokens, pairs) counted over the whole step, across gradient accumulation and
processes, so every unit weighs the same however the batch was split.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from mmpost.data.batches import Batch
from mmpost.training.loop import StepFn, Training, count_batches


@dataclass
class BatchLoss:
    """A stage's loss on one micro-batch.

    Attributes:
        loss_sum: scalar, the sum of the per-unit losses.
        units: how many terms the sum holds: label tokens for token losses, pairs for preference losses.
        stats: further per-unit quantities summed like the loss (``rewards/chosen``...), logged as step means.
    """

    loss_sum: torch.Tensor
    units: int
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


class StageLoss(Protocol):
    """What ``supervised_step`` needs of a stage's loss."""

    def units(self, batch: Batch) -> int:
        """What the batch's loss is normalised by (label tokens, pairs)."""

    def __call__(self, model: torch.nn.Module, batch: Batch) -> BatchLoss: ...


@dataclass
class StepSums:
    """What ``optimizer_step`` measured: the counted micro-batches' summed losses and stats (this process only)."""

    loss_sum: torch.Tensor
    stats: dict[str, torch.Tensor]
    grad_norm: float | None


def optimizer_step(
    training: Training,
    items: Sequence[Any],
    loss_fn: Callable[[torch.nn.Module, Any], BatchLoss],
    scale: float,
    counted: Sequence[bool] | None = None,
    update: bool = True,
) -> StepSums:
    """One optimizer update: backward of every item's ``loss_sum * scale``, clipping, optimizer and schedule step.

    Args:
        items: the step's micro-batches (or GRPO's rollouts), each passed to ``loss_fn`` with the DDP model.
        scale: turns the summed loss into the step's loss. DDP averages gradients over processes, so a loss
            normalised by a count over every process is scaled by the number of processes.
        counted: per item, False for a stand-in whose loss is multiplied by 0 (it runs only so that every
            process joins DDP's collectives); its figures are not summed.
        update: False when nothing of the step is to be learnt (every sample of every process skipped): no
            forward, no update; the schedule still advances.
    """
    acc, t = training.accelerator, training.ctx.cfg.train
    loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
    stats: dict[str, torch.Tensor] = {}
    for i, item in enumerate(items if update else []):
        real = counted is None or counted[i]
        with training.sharding.accumulating(training.ddp_model, last=i == len(items) - 1):
            out = loss_fn(training.ddp_model, item)
            training.sharding.backward(out.loss_sum * (scale if real else 0.0))
        if real:
            loss_sum += out.loss_sum.detach().double()
            for key, value in out.stats.items():
                stats[key] = stats.get(key, 0.0) + value.detach().double()
    grad_norm = None
    if update:
        if t.max_grad_norm > 0:
            grad_norm = training.sharding.clip(training.trainable, t.max_grad_norm)
        training.optimizer.step()
        training.scheduler.step()
    else:
        with warnings.catch_warnings():  # torch warns when the schedule advances before a first update
            warnings.simplefilter("ignore", UserWarning)
            training.scheduler.step()
    training.optimizer.zero_grad(set_to_none=True)
    return StepSums(loss_sum, stats, grad_norm)


def supervised_step(loss: StageLoss, prepare: Callable[[Batch], Batch] | None = None) -> StepFn:
    """The step of conversation and preference stages: one update on the summed loss of the micro-batches
    divided by their units counted over every process.

    A process whose micro-batch lost every sample runs a stand-in sample with weight 0, because DDP's forward and
    backward are collective and the other processes wait in them; alone, it leaves that micro-batch out.

    Args:
        loss: the stage's loss and what it is normalised by.
        prepare: rewrites each micro-batch (on the device) before it is counted, e.g. with the model's own
            samples as answers (on-policy distillation).
    """

    def step(training: Training, micro: list[Batch]) -> dict[str, Any]:
        acc = training.accelerator
        micro = [b.to(acc.device) for b in micro]
        if prepare is not None:  # it may generate: every unit unsharded, on every process together
            with training.sharding.gathered(training.model):
                micro = [prepare(b) for b in micro]
        (units,) = count_batches(training, micro, sum(loss.units(b) for b in micro if not b.empty))
        counted = [not b.empty for b in micro]
        if acc.num_processes == 1:
            micro = [b for b in micro if not b.empty]
            counted = [True] * len(micro)
        else:
            micro = [training.stand_in().to(acc.device) if b.empty else b for b in micro]
        sums = optimizer_step(training, micro, loss, acc.num_processes / max(units, 1.0), counted, update=units > 0)
        for batch, real in zip(micro, counted, strict=True):
            if real:
                training.throughput.tokens += int(batch.attention_mask.sum())
                training.throughput.samples += len(batch.ids)
        loss_value = float(acc.reduce(sums.loss_sum, reduction="sum")) / units if units > 0 else math.nan
        if units > 0 and not math.isfinite(loss_value):  # before the step, so the weights stay as they were
            raise FloatingPointError(
                f"loss is {loss_value} at step {training.state.step + 1}: lower train.lr, check the data or use "
                f"train.precision=fp32; resume from the last checkpoint under {training.ctx.run_dir / 'checkpoints'}"
            )
        return {
            "loss": loss_value,
            "grad_norm": sums.grad_norm,
            "tokens": int(units),
            **step_means(sums.stats, acc, units),
        }

    return step


def step_means(stats: dict[str, torch.Tensor], acc, units: float) -> dict[str, float]:
    """Per-unit means of a step's summed stats over every process (keys in sorted order on every process)."""
    if not stats:
        return {}
    keys = sorted(stats)
    sums = acc.reduce(torch.stack([stats[k] for k in keys]), reduction="sum")
    return {k: float(v) / max(units, 1.0) for k, v in zip(keys, sums.tolist(), strict=True)}
