"""The training loop every stage runs.

::

    training = start_training(ctx, model, parts, loader, evaluator)   # freeze, optimizer, resume or evaluate
    summary = train(training, step)                                   # the loop below, then final/
      while step < total:
          micro = next grad_accum micro-batches                       # samples and skips counted
          record = step(training, micro)                              # the stage: one optimizer_step or more
          log the record; evaluate, checkpoint, stop on a signal

A stage's step decides what one loop step is: for conversations and preference pairs it is
``supervised_step(loss)``; GRPO's step samples and scores completions, then takes μ updates on them. Every update
goes through ``optimizer_step`` (``mmpost.training.step``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mmpost.config import to_dict
from mmpost.data.batches import Batch
from mmpost.data.loader import EpochBatchSampler, StandIn, make_loader, worker_count
from mmpost.data.pipeline import Pipeline
from mmpost.data.sample import DataError, Sample
from mmpost.model.lmm import LMM
from mmpost.training.changes import convert_position, rebuild_schedule
from mmpost.training.checkpoint import load_trainer_state, save_checkpoint, set_rng_state
from mmpost.training.context import RunContext
from mmpost.training.interrupt import Interrupted, StopOnSignal
from mmpost.training.metrics import MetricsLog
from mmpost.training.trainable import (
    apply_trainable,
    compile_regions,
    make_optimizer,
    model_flops_per_token,
    set_train_mode,
    trains_encoders,
)

log = logging.getLogger("mmpost")

MIN_SAMPLES_FOR_BAD_FRACTION = 50


@dataclass
class LoopState:
    """Where a run stands; written into every checkpoint.

    Attributes:
        step: optimizer-loop steps done.
        epoch, batch: the data position (the next batch of this process is batch ``batch`` of epoch ``epoch``).
        seen, skipped: samples drawn so far over every process, and how many of them were skipped.
        last_skipped: the latest skip's reason, for the error when too many were skipped.
    """

    step: int = 0
    epoch: int = 0
    batch: int = 0
    seen: int = 0
    skipped: int = 0
    last_skipped: str = ""


@dataclass
class Throughput:
    """Real tokens and samples trained on since the last logged step."""

    tokens: int = 0
    samples: int = 0
    since: float = field(default_factory=time.perf_counter)

    def rates(self, processes: int) -> dict[str, float]:
        if not self.samples:
            return {}
        elapsed = time.perf_counter() - self.since
        return {"tokens_per_s": self.tokens * processes / elapsed, "samples_per_s": self.samples * processes / elapsed}


@dataclass
class Training:
    """Everything a stage's steps need, built once by ``start_training``.

    Attributes:
        model: the model itself, for evaluation, generation and saving.
        ddp_model: the model as the accelerator prepared it (DDP-wrapped with several processes): the forward
            every training loss calls, so that gradients are synchronised.
        trainable: the parameters that train, for clipping.
        batches: micro-batches forever, from the current data position.
        stand_in: a usable one-sample batch, for a process whose micro-batch lost every sample.
        total: loop steps of the run.
    """

    ctx: RunContext
    model: LMM
    ddp_model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    trainable: list[torch.nn.Parameter]
    batches: Iterator[Batch]
    stand_in: StandIn
    total: int
    state: LoopState
    evaluate: Any
    evals: list[dict[str, Any]]
    metrics: MetricsLog
    stop: StopOnSignal = field(default_factory=StopOnSignal)
    throughput: Throughput = field(default_factory=Throughput)

    @property
    def accelerator(self):
        return self.ctx.accelerator

    @property
    def sharding(self):
        return self.ctx.sharding

    def evaluated(self, step: int) -> dict[str, Any]:
        """The evaluator's figures at ``step``, with every model it runs unsharded (``Sharding.gathered``)."""
        with self.sharding.gathered(self.model, *getattr(self.evaluate, "also_runs", ())):
            return self.evaluate(self.model, step)

    def save(self) -> Path:
        loop = {"state": asdict(self.state), "evals": self.evals}
        t = self.ctx.cfg.train
        return save_checkpoint(
            self.ctx.run_dir,
            self.state.step,
            self.ddp_model,
            self.optimizer,
            self.scheduler,
            loop,
            self.ctx.cfg,
            self.sharding,
            t.keep_checkpoints,
        )

    def end_step(self) -> None:
        """Evaluates and checkpoints after the step when the config asks for it; after a SIGTERM or SIGINT,
        checkpoints and raises ``Interrupted``."""
        t, step = self.ctx.cfg.train, self.state.step
        if self.evaluate.enabled and ((t.eval_every and step % t.eval_every == 0) or step == self.total):
            self.evals.append(self.evaluated(step) | {"data/skipped": self.state.skipped})
            self.metrics.write(self.evals[-1])
        saved = None
        if t.save_every and step % t.save_every == 0 and step < self.total:
            saved = self.save()
        signum = self.stop.requested(self.accelerator)
        if signum is not None and step < self.total:
            raise Interrupted(signum, step, saved or self.save())


def training_loader(ctx: RunContext, samples: list[Sample] | None, pipeline: Pipeline):
    """This process's shuffled share of ``data.train`` (JSON samples, or the shards when ``samples`` is None)."""
    cfg, acc = ctx.cfg, ctx.accelerator
    return make_loader(
        samples,
        pipeline,
        batch_size=cfg.train.batch_size,
        shards=cfg.data.train.path,
        rank=acc.process_index,
        world=acc.num_processes,
        seed=cfg.seed,
        shuffle=True,
        num_workers=worker_count(cfg.data.num_workers, acc.device),
    )


def micro_batches(loader, sampler: EpochBatchSampler | None, state: LoopState) -> Iterator[Batch]:
    """Batches forever, epoch after epoch, from the position in ``state`` (epoch, batch), updating it."""
    while True:
        if sampler is not None and state.batch >= sampler.batches_per_epoch():
            # a checkpoint taken right after an epoch's last batch: resume at the next epoch
            state.epoch += 1
            state.batch = 0
        if sampler is not None:
            sampler.set_position(state.epoch, state.batch)
        batches = iter(loader)
        if sampler is None:  # shards have no random access: skip what was consumed before a resume
            for _ in range(state.batch):
                next(batches, None)
        produced = False
        for batch in batches:
            produced = True
            state.batch += 1
            yield batch
        if not produced:
            raise DataError("the training data gave no batch: it is empty or smaller than one global batch")
        state.epoch += 1
        state.batch = 0


def start_training(
    ctx: RunContext,
    model: LMM,
    parts: Sequence[str],
    loader_and_sampler: tuple[Any, EpochBatchSampler | None],
    evaluate: Any,
    updates_per_step: int = 1,
) -> Training:
    """Freezes all but ``parts``, builds the optimizer and schedule, prepares the model, and restores a resumed
    run's state (or evaluates the starting model).

    Args:
        loader_and_sampler: ``training_loader``'s result.
        evaluate: ``evaluate(model, step) -> metrics`` with an ``enabled`` flag.
        updates_per_step: optimizer updates per loop step (grpo's μ), for the schedule's length.
    """
    acc, t = ctx.accelerator, ctx.cfg.train
    loader, sampler = loader_and_sampler
    table = apply_trainable(model, parts)
    if acc.is_main_process:
        log.info("trainable parameters (%s):\n%s", ", ".join(parts), table)
    if sampler is None and t.max_steps == 0:
        raise DataError("webdataset shards have no known length: set train.max_steps")
    if sampler is not None and sampler.batches_per_epoch() < t.grad_accum:
        raise DataError(
            f"data.train has {sampler.n} samples, fewer than one optimizer step "
            f"({t.batch_size} x {acc.num_processes} processes x {t.grad_accum} accumulation)"
        )
    total = t.max_steps or max(1, math.ceil(t.epochs * sampler.batches_per_epoch() / t.grad_accum))
    if t.gradient_checkpointing:
        model.base_llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    set_train_mode(model)
    sharding = ctx.sharding
    sharding.shard(model)  # FSDP2: before the optimizer, which must hold the sharded parameters
    if t.compile:
        compile_regions(model)
    optimizer, scheduler = make_optimizer(model, t, parts, total * updates_per_step)
    # DDP waits forever for weights that get no gradient in a step: trained encoder layers past the feature
    # layer, and with several modalities a batch without one medium
    unused = trains_encoders(parts) or len(model.modalities) > 1
    ddp_model, optimizer = sharding.prepare(model, optimizer, unused_parameters=unused)
    metrics = MetricsLog(ctx.run_dir, enabled=acc.is_main_process)
    state, evals = LoopState(), []
    if ctx.checkpoint is not None:
        trainer, rng = load_trainer_state(ctx.checkpoint, acc.process_index, acc.num_processes)
        fresh = [{"lr": g["lr"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
        sharding.load_state(ctx.checkpoint, ddp_model, optimizer, trainer)
        scheduler.load_state_dict(trainer["scheduler"])
        state = LoopState(**trainer["loop"]["state"])
        evals = trainer["loop"]["evals"]
        if ctx.changes:  # --allow-changes: defined in mmpost.training.changes
            rebuild_schedule(optimizer, scheduler, fresh)
            if "train.batch_size" in ctx.changes:
                convert_position(state, ctx.changes["train.batch_size"][0], t.batch_size, acc.num_processes)
        metrics.truncate_after(state.step)
        set_rng_state(rng)
    elif evaluate.enabled:
        with sharding.gathered(model, *getattr(evaluate, "also_runs", ())):
            evals.append(evaluate(model, 0))
        metrics.write(evals[-1])
    trainable = [p for p in model.parameters() if p.requires_grad]
    return Training(
        ctx,
        model,
        ddp_model,
        optimizer,
        scheduler,
        trainable,
        micro_batches(loader, sampler, state),
        StandIn(loader),
        total,
        state,
        evaluate,
        evals,
        metrics,
    )


# A stage's step: one loop step on its micro-batches (one or more optimizer updates); returns what to log.
StepFn = Callable[[Training, list[Batch]], dict[str, Any]]


def train(training: Training, step: StepFn) -> dict[str, Any]:
    """Runs ``step`` on every loop step's micro-batches until the run's last step; logs, evaluates, checkpoints
    and stops cleanly on SIGTERM / SIGINT; writes ``final/`` and ``summary.json``.

    Returns:
        the run summary (also written to ``RUN/summary.json``): first and last evaluation, steps, time.
    """
    cfg, acc, state = training.ctx.cfg, training.accelerator, training.state
    bar = tqdm(total=training.total, initial=state.step, desc=cfg.stage.name, disable=not acc.is_main_process)
    started = time.perf_counter()
    with training.stop, bar:  # the bar ends its line on an error too, so that the error starts a line of its own
        while state.step < training.total:
            micro = [next(training.batches) for _ in range(cfg.train.grad_accum)]
            record = step(training, micro)
            state.step += 1
            bar.update(1)
            bar.set_postfix({k: f"{record[k]:.4f}" for k in ("loss", "reward/mean") if k in record})
            if state.step % cfg.train.log_every == 0 or state.step == training.total:
                training.metrics.write(
                    {
                        "step": state.step,
                        **record,
                        "lr": training.scheduler.get_last_lr()[0],
                        "epoch": state.epoch,
                        **training.throughput.rates(acc.num_processes),
                        "data/skipped": state.skipped,
                    }
                )
                training.throughput = Throughput()
            training.end_step()
    check_bad_fraction(state, cfg.data.max_bad_fraction, [], final=True)
    return finish(training, time.perf_counter() - started)


def count_batches(training: Training, micro: Sequence[Batch], *extra: float) -> list[float]:
    """Adds a step's drawn and skipped samples over every process to the loop state (stopping the run when too
    many were skipped); returns ``extra`` summed over every process."""
    acc, state = training.accelerator, training.state
    local = [sum(b.drawn for b in micro), sum(len(b.skipped) for b in micro), *extra]
    n_seen, n_skipped, *totals = acc.reduce(torch.tensor(local, dtype=torch.float64, device=acc.device), "sum").tolist()
    state.seen += int(n_seen)
    state.skipped += int(n_skipped)
    check_bad_fraction(state, training.ctx.cfg.data.max_bad_fraction, [r for b in micro for r in b.skipped])
    return totals


def check_bad_fraction(state: LoopState, limit: float, reasons: list[str], final: bool = False) -> None:
    """Raises DataError when more than ``limit`` of the samples so far were skipped (judged after
    ``MIN_SAMPLES_FOR_BAD_FRACTION`` samples, and always at the end of the run)."""
    for reason in reasons:
        log.warning("skipped %s", reason)
    if reasons:
        state.last_skipped = reasons[-1]
    if (final or state.seen >= MIN_SAMPLES_FOR_BAD_FRACTION) and state.skipped > limit * state.seen:
        example = f" (latest: {state.last_skipped})" if state.last_skipped else ""
        raise DataError(
            f"{state.skipped} of {state.seen} samples skipped so far, more than data.max_bad_fraction={limit}"
            f"{example}; fix the data or raise data.max_bad_fraction; train.log lists every skipped sample"
        )


def finish(training: Training, seconds: float) -> dict[str, Any]:
    """Saves ``final/`` (the whole model, however it was sharded) and ``summary.json``."""
    ctx, acc, state, evals = training.ctx, training.accelerator, training.state, training.evals
    memory = training.sharding.local_bytes(training.ddp_model, training.optimizer)
    summary = {
        "stage": ctx.cfg.stage.name,
        "steps": state.step,
        "seconds": round(seconds, 1),
        "samples_seen": state.seen,
        "samples_skipped": state.skipped,
        "eval_before": evals[0] if evals else None,
        "eval_after": evals[-1] if len(evals) > 1 else None,
        "final": str(ctx.run_dir / "final"),
        "model_flops_per_token": model_flops_per_token(training.model),
        "sharding": training.sharding.kind,
        "memory_per_process": {f"{k}_bytes": v for k, v in memory.items()},
        "config": to_dict(ctx.cfg),
    }
    acc.wait_for_everyone()
    training.sharding.save_whole(training.ddp_model, ctx.run_dir / "final")
    if acc.is_main_process:
        (Path(ctx.run_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    training.metrics.close()
    acc.wait_for_everyone()
    return summary
