"""Held-out evaluation of conversation stages: token loss, and accuracy of greedy answers.

Each process evaluates its shard of the held-out set; sums are reduced across processes. An answer is right
when it equals the reference by ``mmpost.answers`` (the rule GRPO's accuracy reward uses too).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from mmpost.answers import completion_answers
from mmpost.data.batches import ConversationBatch, PromptBatch
from mmpost.data.loader import make_loader, read_source, worker_count
from mmpost.data.pipeline import ConversationPipeline, Pipeline, PromptPipeline
from mmpost.data.sample import DataError, Sample
from mmpost.model.lmm import LMM
from mmpost.training.context import RunContext
from mmpost.training.trainable import set_train_mode

log = logging.getLogger("mmpost")


def read_held_out(ctx: RunContext) -> list[Sample] | None:
    """The first ``eval.max_samples`` samples of ``data.eval``, or None when there is no held-out set."""
    cfg = ctx.cfg
    if cfg.data.eval is None:
        return None
    samples = read_source(cfg.data.eval, "data.eval")
    if samples is None:
        raise DataError("data.eval must be a .json / .jsonl file (held-out sets are read whole)")
    return samples[: cfg.eval.max_samples]


def held_out_loader(ctx: RunContext, samples: list[Sample], pipeline: Pipeline):
    """This process's share of the held-out samples, in order, as ``pipeline``'s batches."""
    acc, cfg = ctx.accelerator, ctx.cfg
    loader, _ = make_loader(
        samples,
        pipeline,
        batch_size=cfg.eval.batch_size,
        rank=acc.process_index,
        world=acc.num_processes,
        seed=cfg.seed,
        num_workers=worker_count(cfg.data.num_workers, acc.device),
    )
    return loader


class Evaluator:
    """Held-out loss and generation accuracy on ``data.eval``, sharded across processes."""

    def __init__(self, ctx: RunContext, model: LMM) -> None:
        self.ctx = ctx
        samples = read_held_out(ctx)
        self.enabled = samples is not None
        if not self.enabled:
            return
        max_length = ctx.cfg.data.max_length
        self.tasks = sorted({str(s.meta.get("task", "")) for s in samples} - {""})
        self.loss_loader = held_out_loader(ctx, samples, ConversationPipeline.for_model(model, max_length))
        self.gen_loader = held_out_loader(
            ctx, samples, PromptPipeline.for_model(model, max_length, need_reference=True)
        )

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


@torch.no_grad()
def eval_loss(model: LMM, batches: Iterable[ConversationBatch], accelerator) -> float:
    """Mean token cross-entropy over the held-out answers (all processes' tokens weigh equally)."""
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for batch in batches:
        if batch.empty:
            continue
        batch = batch.to(accelerator.device)
        with accelerator.autocast():
            out = model(batch.input_ids, batch.attention_mask, batch.media, labels=batch.labels, cross_entropy=True)
        loss_sum = out.cross_entropy
        totals += torch.tensor([loss_sum.item(), out.targets.numel()], dtype=torch.float64, device=totals.device)
    totals = accelerator.reduce(totals, reduction="sum")
    return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")


@torch.no_grad()
def eval_accuracy(
    model: LMM, batches: Iterable[PromptBatch], accelerator, max_new_tokens: int, tasks: Sequence[str] = ()
) -> tuple[dict[str, float], list[dict[str, str]]]:
    """Greedy answers vs. references: overall and per-task accuracy, plus a few examples.

    Args:
        tasks: every task name of the whole held-out set (the same list on every process).
    """
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    examples = []
    for batch in batches:
        if batch.empty:
            continue
        batch = batch.to(accelerator.device)
        with accelerator.autocast():
            new = model.generate(batch.input_ids, batch.attention_mask, batch.media, max_new_tokens)
        answers = model.tokenizer.batch_decode(new, skip_special_tokens=True)
        for answer, reference, task in zip(answers, batch.references, batch.tasks, strict=True):
            ok = int(completion_answers(answer, reference))
            for key in ("", task) if task else ("",):
                hits[key][0] += ok
                hits[key][1] += 1
            if len(examples) < 3:
                examples.append({"answer": answer, "reference": reference})
    keys = ["", *sorted(set(tasks) - {""})]
    counts = torch.tensor([hits[k] for k in keys], dtype=torch.float64, device=accelerator.device).reshape(-1, 2)
    counts = accelerator.reduce(counts, reduction="sum")
    result = {}
    for key, (n_ok, n) in zip(keys, counts.tolist(), strict=True):
        if n > 0:
            result["eval/accuracy" + (f"/{key}" if key else "")] = n_ok / n
    return result, examples
