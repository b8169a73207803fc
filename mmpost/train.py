"""The training loop every stage shares: fetch an optimizer step's micro-batches, normalise the summed
loss by the label tokens of the whole step (across accumulation and processes), backward, clip,
step; log, evaluate, checkpoint.

A stage supplies a ``loss_fn(model, batch) -> LossOutput`` (summed loss and token count) and the
parts to train; everything else is here and in ``mmpost.training``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mmpost.config import to_dict
from mmpost.data.loader import EpochBatchSampler, StandIn, make_loader, read_source
from mmpost.data.sample import DataError, Sample
from mmpost.model.lmm import LMM, LossOutput
from mmpost.training.accel import allow_unused_parameters
from mmpost.training.changes import convert_position, rebuild_schedule
from mmpost.training.checkpoint import load_trainer_state, save_checkpoint, set_rng_state
from mmpost.training.evaluate import eval_accuracy, eval_loss, to_device
from mmpost.training.interrupt import Interrupted, StopOnSignal
from mmpost.training.metrics import MetricsLog
from mmpost.training.parts import apply_trainable, make_optimizer, model_flops_per_token, set_train_mode
from mmpost.training.run import RunContext

log = logging.getLogger("mmpost")

LossFn = Callable[[torch.nn.Module, dict[str, Any]], LossOutput]
MIN_SAMPLES_FOR_BAD_FRACTION = 50


def conversation_loss(model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
    """Summed next-token cross-entropy on the assistant tokens of a batch of conversations."""
    return model(batch["input_ids"], batch["attention_mask"], batch["media"], labels=batch["labels"])


def label_tokens(batch: dict[str, Any]) -> int:
    """The units a conversation loss is normalised by: its label tokens."""
    return int((batch["labels"][:, 1:] != -100).sum())


def micro_batches(loader, sampler: EpochBatchSampler | None, state: dict[str, int]) -> Iterator[dict[str, Any]]:
    """Batches forever, epoch after epoch, from the position in ``state`` (epoch, batch), updating it."""
    while True:
        if sampler is not None and state["batch"] >= sampler.batches_per_epoch():
            # a checkpoint taken right after an epoch's last batch: resume at the next epoch
            state["epoch"] += 1
            state["batch"] = 0
        if sampler is not None:
            sampler.set_position(state["epoch"], state["batch"])
        batches = iter(loader)
        if sampler is None:  # shards have no random access: skip what was consumed before a resume
            for _ in range(state["batch"]):
                next(batches, None)
        produced = False
        for batch in batches:
            produced = True
            state["batch"] += 1
            yield batch
        if not produced:
            raise DataError("the training data gave no batch: it is empty or smaller than one global batch")
        state["epoch"] += 1
        state["batch"] = 0


def read_held_out(ctx: RunContext) -> list[Sample] | None:
    """The first ``eval.max_samples`` samples of ``data.eval``, or None when there is no held-out set."""
    cfg = ctx.cfg
    if cfg.data.eval is None:
        return None
    samples = read_source(cfg.data.eval, "data.eval")
    if samples is None:
        raise DataError("data.eval must be a .json / .jsonl file (held-out sets are read whole)")
    return samples[: cfg.eval.max_samples]


def held_out_loader(ctx: RunContext, model: LMM, samples: list[Sample], mode: str):
    """This process's share of the held-out samples, in order, as batches of ``mode``."""
    cfg, acc = ctx.cfg, ctx.accelerator
    loader, _ = make_loader(samples, cfg.data.eval, model, cfg.data, cfg.eval.batch_size, mode, acc.process_index,
                            acc.num_processes, cfg.seed, shuffle=False)  # fmt: skip
    return loader


class Evaluator:
    """Held-out loss and generation accuracy on ``data.eval``, sharded across processes."""

    def __init__(self, ctx: RunContext, model: LMM) -> None:
        self.ctx = ctx
        samples = read_held_out(ctx)
        self.enabled = samples is not None
        if not self.enabled:
            return
        self.tasks = sorted({str(s.meta.get("task", "")) for s in samples} - {""})
        self.loss_loader = held_out_loader(ctx, model, samples, "train")
        self.gen_loader = held_out_loader(ctx, model, samples, "generate")

    def __call__(self, model: LMM, step: int) -> dict[str, Any]:
        if not self.enabled:
            return {}
        cfg, acc = self.ctx.cfg, self.ctx.accelerator
        model.eval()
        record: dict[str, Any] = {"step": step, "eval/loss": eval_loss(model, self.loss_loader, acc)}
        if cfg.eval.accuracy:
            accuracy, examples = eval_accuracy(model, self.gen_loader, acc, cfg.eval.max_new_tokens, self.tasks)
            record |= accuracy
            log.info("step %d examples: %s", step, examples)
        set_train_mode(model)
        return record


@dataclass
class Loop:
    """What a stage's training loop holds between optimizer steps (built by ``start_loop``)."""

    wrapped: torch.nn.Module  # the model as the accelerator prepared it (DDP-wrapped with several processes)
    optimizer: Any
    scheduler: Any
    metrics: MetricsLog
    evaluate: Any
    batches: Iterator[dict[str, Any]]
    trainable: list[torch.nn.Parameter]
    total: int
    state: dict[str, int]
    evals: list[dict[str, Any]]
    stand_in: StandIn
    stop: StopOnSignal = field(default_factory=StopOnSignal)

    def end_step(self, ctx: RunContext, model: LMM) -> None:
        """Evaluates and checkpoints after ``state["step"]`` when the config asks for it; after a SIGTERM or
        SIGINT, checkpoints and raises ``Interrupted``."""
        t, step = ctx.cfg.train, self.state["step"]
        if self.evaluate.enabled and ((t.eval_every and step % t.eval_every == 0) or step == self.total):
            self.evals.append(self.evaluate(model, step) | {"data/skipped": self.state["skipped"]})
            self.metrics.write(self.evals[-1])
        saved = None
        if t.save_every and step % t.save_every == 0 and step < self.total:
            saved = self.save(ctx, model)
        signum = self.stop.requested(ctx.accelerator)
        if signum is not None and step < self.total:
            checkpoint = saved or self.save(ctx, model)
            raise Interrupted(signum, step, checkpoint)

    def save(self, ctx: RunContext, model: LMM) -> Path:
        loop = {"state": dict(self.state), "evals": self.evals}
        return save_checkpoint(ctx.run_dir, self.state["step"], model, self.optimizer, self.scheduler, loop, ctx.cfg,
                               ctx.accelerator, ctx.cfg.train.keep_checkpoints)  # fmt: skip


def start_loop(
    ctx: RunContext,
    model: LMM,
    parts: Sequence[str],
    samples: list[Sample] | None,
    mode: str = "train",
    evaluator: Any = None,
    updates_per_step: int = 1,
    pipeline: Any = None,
) -> Loop:
    """Freezes all but ``parts``, builds the data loader, optimizer and schedule, prepares the model, and
    restores a resumed run's state (or evaluates the starting model).

    Args:
        samples: ``data.train``'s samples as ``read_source`` gave them (None for shards).
        mode: how samples become batches (see ``SampleProcessor``).
        evaluator: ``evaluator(model, step) -> metrics`` with an ``enabled`` flag; default: held-out loss and
            generation accuracy on ``data.eval``.
        updates_per_step: optimizer updates per loop step (grpo's μ), for the schedule's length.
        pipeline: replaces the model's own sample processing and collation (see ``make_loader``).
    """
    cfg, acc, t = ctx.cfg, ctx.accelerator, ctx.cfg.train
    table = apply_trainable(model, parts)
    if acc.is_main_process:
        log.info("trainable parameters (%s):\n%s", ", ".join(parts), table)
    loader, sampler = make_loader(
        samples, cfg.data.train, model, cfg.data, t.batch_size, mode,
        acc.process_index, acc.num_processes, cfg.seed, shuffle=True, pipeline=pipeline,
    )  # fmt: skip
    if sampler is None and t.max_steps == 0:
        raise DataError("webdataset shards have no known length: set train.max_steps")
    if sampler is not None and sampler.batches_per_epoch() < t.grad_accum:
        raise DataError(
            f"data.train has {len(samples)} samples, fewer than one optimizer step "
            f"({t.batch_size} x {acc.num_processes} processes x {t.grad_accum} accumulation)"
        )
    total = t.max_steps or max(1, math.ceil(t.epochs * sampler.batches_per_epoch() / t.grad_accum))
    evaluate = evaluator if evaluator is not None else Evaluator(ctx, model)
    if t.gradient_checkpointing:
        model.base_llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer, scheduler = make_optimizer(model, t, parts, total * updates_per_step)
    set_train_mode(model)
    allow_unused_parameters(acc, parts, len(model.modalities))
    wrapped, optimizer = acc.prepare(model, optimizer)
    metrics = MetricsLog(ctx.run_dir, enabled=acc.is_main_process)
    state = {"step": 0, "epoch": 0, "batch": 0, "seen": 0, "skipped": 0}
    evals: list[dict[str, Any]] = []
    if ctx.checkpoint is not None:
        trainer, rng = load_trainer_state(ctx.checkpoint, acc.process_index)
        fresh = [{"lr": g["lr"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
        optimizer.load_state_dict(trainer["optimizer"])
        scheduler.load_state_dict(trainer["scheduler"])
        state |= trainer["loop"]["state"]
        evals = trainer["loop"]["evals"]
        if ctx.changes:  # --allow-changes: defined in mmpost.training.changes
            rebuild_schedule(optimizer, scheduler, fresh)
            if "train.batch_size" in ctx.changes:
                convert_position(state, ctx.changes["train.batch_size"][0], t.batch_size, acc.num_processes)
        metrics.truncate_after(state["step"])
        set_rng_state(rng)
    elif evaluate.enabled:
        evals.append(evaluate(model, 0))
        metrics.write(evals[-1])
    trainable = [p for p in model.parameters() if p.requires_grad]
    return Loop(wrapped, optimizer, scheduler, metrics, evaluate, micro_batches(loader, sampler, state), trainable,
                total, state, evals, StandIn(loader))  # fmt: skip


def count_batches(ctx: RunContext, state: dict[str, int], micro: list[dict[str, Any]], *extra: float) -> list[float]:
    """Adds a step's samples and skipped samples over every process to ``state`` (stopping the run when too many
    were skipped); returns ``extra`` summed over every process."""
    acc = ctx.accelerator
    local = [sum(b["num_samples"] for b in micro), sum(len(b["skipped"]) for b in micro), *extra]
    n_seen, n_skipped, *totals = acc.reduce(torch.tensor(local, dtype=torch.float64, device=acc.device), "sum").tolist()
    state["seen"] += int(n_seen)
    state["skipped"] += int(n_skipped)
    check_bad_fraction(state, ctx.cfg.data.max_bad_fraction, [r for b in micro for r in b["skipped"]])
    return totals


def fit(
    ctx: RunContext,
    model: LMM,
    parts: Sequence[str],
    loss_fn: LossFn = conversation_loss,
    units: Callable[[dict[str, Any]], int] = label_tokens,
    mode: str = "train",
    evaluator: Any = None,
    samples: list[Sample] | None | str = "read",
    pipeline: Any = None,
    prepare: Callable[[LMM, dict[str, Any]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Trains ``parts`` of ``model`` on ``data.train``; writes metrics, checkpoints and ``final/``.

    Args:
        loss_fn: the stage's loss: a summed loss over a micro-batch and its per-unit stats.
        units: what one micro-batch's loss is normalised by (label tokens; pairs for preference losses). The
            loss of a step is the sum over its micro-batches and processes divided by their total units.
        mode: how samples become batches (see ``SampleProcessor``): "train" or "pair".
        evaluator: as in ``start_loop``.
        samples: ``data.train``'s samples when the stage has read them already; "read" reads them here.
        pipeline: as in ``start_loop``.
        prepare: rewrites each micro-batch (on the device) before it is counted and trained on, e.g. with
            the model's own samples as answers (on-policy distillation).

    Returns:
        the run summary (also written to ``RUN/summary.json``): first and last evaluation, steps, time.
    """
    cfg, acc = ctx.cfg, ctx.accelerator
    if samples == "read":
        samples = read_source(cfg.data.train, "data.train")
    loop = start_loop(ctx, model, parts, samples, mode, evaluator, pipeline=pipeline)
    state = loop.state
    bar = tqdm(total=loop.total, initial=state["step"], desc=cfg.stage["name"], disable=not acc.is_main_process)
    started, window = time.perf_counter(), {"tokens": 0, "samples": 0, "time": time.perf_counter()}
    with loop.stop, bar:  # the bar ends its line on an error too, so that the error starts a line of its own
        while state["step"] < loop.total:
            train_step(ctx, model, loop, loss_fn, units, prepare, window, bar)
    check_bad_fraction(state, cfg.data.max_bad_fraction, [], final=True)
    return finish(ctx, model, state, loop.evals, time.perf_counter() - started, loop.metrics)


def train_step(ctx: RunContext, model: LMM, loop: Loop, loss_fn: LossFn, units, prepare, window, bar) -> None:
    """One optimizer step over ``train.grad_accum`` micro-batches, then logging, evaluation and checkpoints."""
    acc, t = ctx.accelerator, ctx.cfg.train
    wrapped, optimizer, scheduler, metrics = loop.wrapped, loop.optimizer, loop.scheduler, loop.metrics
    state, total, trainable = loop.state, loop.total, loop.trainable
    micro = [next(loop.batches) for _ in range(t.grad_accum)]
    if prepare is not None:
        micro = [prepare(model, to_device(b, acc.device)) for b in micro]
    (n_tokens,) = count_batches(ctx, state, micro, sum(units(b) for b in micro))
    loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
    stats: dict[str, torch.Tensor] = {}
    # A step in which every sample of every process was skipped learns nothing: no forward, no update (the
    # schedule still advances). The token count is global, so every process decides alike.
    active = n_tokens > 0
    for i, batch in enumerate(micro if active else []):
        sync = contextlib.nullcontext() if i == len(micro) - 1 else acc.no_sync(wrapped)
        real = bool(batch["ids"])
        if not real and acc.num_processes == 1:
            continue  # every sample of it was skipped
        if not real:
            # Every sample of this process's micro-batch was skipped while the others have some: it still
            # runs a forward and backward, on a stand-in sample with weight 0, because DDP's forward and
            # backward are collective and the other processes wait in them.
            batch = loop.stand_in()
        with sync:
            out = loss_fn(wrapped, to_device(batch, acc.device))
            # DDP averages gradients over processes; scaling by their number makes the
            # result the gradient of (summed loss / tokens of the whole step).
            loss = out.loss_sum * (acc.num_processes / max(n_tokens, 1.0) if real else 0.0)
            acc.backward(loss)
        if not real:
            continue
        loss_sum += out.loss_sum.detach().double()
        for key, value in out.stats.items():
            stats[key] = stats.get(key, 0.0) + value.detach().double()
        window["tokens"] += int(batch["attention_mask"].sum())
        window["samples"] += len(batch["ids"])
    loss_value = float(acc.reduce(loss_sum, reduction="sum")) / n_tokens if active else math.nan
    if active and not math.isfinite(loss_value):  # before the step, so the weights stay as they were
        raise FloatingPointError(
            f"loss is {loss_value} at step {state['step'] + 1}: lower train.lr, check the data or use "
            f"train.precision=fp32; resume from the last checkpoint under {ctx.run_dir / 'checkpoints'}"
        )
    grad_norm = acc.clip_grad_norm_(trainable, t.max_grad_norm) if t.max_grad_norm > 0 and active else None
    if active:
        optimizer.step()
        scheduler.step()
    else:
        with warnings.catch_warnings():  # torch warns when the schedule advances before a first update
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    state["step"] += 1
    step = state["step"]
    bar.update(1)
    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
    if step % t.log_every == 0 or step == total:
        elapsed = time.perf_counter() - window["time"]
        metrics.write({
            "step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0], "epoch": state["epoch"],
            "grad_norm": None if grad_norm is None else float(grad_norm), "tokens": int(n_tokens),
            "tokens_per_s": window["tokens"] * acc.num_processes / elapsed,
            "samples_per_s": window["samples"] * acc.num_processes / elapsed,
            "data/skipped": state["skipped"], **step_means(stats, acc, n_tokens),
        })  # fmt: skip
        window.update(tokens=0, samples=0, time=time.perf_counter())
    loop.end_step(ctx, model)


def step_means(stats: dict[str, torch.Tensor], acc, units: float) -> dict[str, float]:
    """Per-unit means of a step's summed stats over every process (keys in sorted order on every process)."""
    if not stats:
        return {}
    keys = sorted(stats)
    sums = acc.reduce(torch.stack([stats[k] for k in keys]), reduction="sum")
    return {k: float(v) / max(units, 1.0) for k, v in zip(keys, sums.tolist(), strict=True)}


def check_bad_fraction(state: dict[str, Any], limit: float, reasons: list[str], final: bool = False) -> None:
    """Raises DataError when more than ``limit`` of the samples so far were skipped (judged after
    ``MIN_SAMPLES_FOR_BAD_FRACTION`` samples, and always at the end of the run)."""
    for reason in reasons:
        log.warning("skipped %s", reason)
    if reasons:
        state["last_skipped"] = reasons[-1]
    seen, skipped = state["seen"], state["skipped"]
    if (final or seen >= MIN_SAMPLES_FOR_BAD_FRACTION) and skipped > limit * seen:
        example = f" (latest: {state['last_skipped']})" if "last_skipped" in state else ""
        raise DataError(
            f"{skipped} of {seen} samples skipped so far, more than data.max_bad_fraction={limit}{example}; "
            "fix the data or raise data.max_bad_fraction; train.log lists every skipped sample"
        )


def finish(
    ctx: RunContext, model: LMM, state: dict[str, int], evals: list[dict[str, Any]], seconds: float, metrics
) -> dict[str, Any]:
    """Saves ``final/`` and ``summary.json``."""
    acc = ctx.accelerator
    summary = {
        "stage": ctx.cfg.stage["name"],
        "steps": state["step"],
        "seconds": round(seconds, 1),
        "samples_seen": state["seen"],
        "samples_skipped": state["skipped"],
        "eval_before": evals[0] if evals else None,
        "eval_after": evals[-1] if len(evals) > 1 else None,
        "final": str(ctx.run_dir / "final"),
        "model_flops_per_token": model_flops_per_token(model),
        "config": to_dict(ctx.cfg),
    }
    acc.wait_for_everyone()
    if acc.is_main_process:
        model.save(ctx.run_dir / "final")
        (Path(ctx.run_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    metrics.close()
    acc.wait_for_everyone()
    return summary
