"""Knowledge distillation: a student LMM learns a frozen teacher LMM's next-token distributions.

White-box, on the answer tokens of instruction data: ``(1 - alpha) * divergence + alpha * cross-entropy``
per token, the divergence being forward KL, reverse KL or GKD's generalised JSD at a temperature
(``mmpost.losses.distill``), summed over answer tokens and divided by their number as in sft. The student
may have a smaller LLM and another encoder or connector (``mmpost.stages.distill.teacher``); the tokenizer must
be the teacher's.

- ``on_policy`` (GKD, Agarwal et al. 2024): that fraction of micro-batches replaces each sample's last
  answer by the student's own sample from its prompt, and the teacher scores it.
- ``teacher_top_k``: the teacher's k most likely tokens at every answer token of the training set are
  computed once before training, and the teacher is freed; the divergence is then taken over those k tokens.

Black-box (sequence-level) distillation is ``mmpost distill-data``: the teacher answers the prompts and
the answers become sft data.

Logged per step: ``distill/divergence``, ``distill/ce`` (per answer token) and ``distill/agreement`` (the
fraction of answer tokens where the student's most likely token is the teacher's).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from mmpost.config import RunConfig
from mmpost.config.fields import check_values, path_field, ranged
from mmpost.data.loader import make_loader, read_source, worker_count
from mmpost.data.pipeline import ConversationPipeline
from mmpost.data.sample import DataError, Sample
from mmpost.interfaces import IGNORE
from mmpost.losses.distill import TopK, token_divergence, top_k
from mmpost.stages.distill.on_policy import StudentAnswers
from mmpost.stages.distill.teacher import DistillBatch, Teacher, load_teacher
from mmpost.training.context import RunContext, build_model, start_run
from mmpost.training.evaluate import Evaluator
from mmpost.training.loop import start_training, train, training_loader
from mmpost.training.step import BatchLoss, supervised_step
from mmpost.training.trainable import resolve_parts

log = logging.getLogger("mmpost")


@dataclass
class DistillOptions:
    """``stage: {name: distill, teacher: RUN, ...}``.

    Attributes:
        teacher: the teacher: an mmpost model directory or a finished run (its ``final/``).
        divergence: forward_kl (classic KD), reverse_kl or jsd.
        beta: jsd's mixture weight of the teacher (0 gives forward_kl, 1 reverse_kl).
        temperature: both models' logits are divided by it before the divergence (and when sampling
            on-policy answers).
        alpha: weight of the cross-entropy on the data's answers; 0 is pure distillation.
        on_policy: fraction of micro-batches whose answers are the student's own samples (GKD's λ).
        max_new_tokens: longest on-policy answer.
        teacher_top_k: 0 runs the teacher at every step; k > 0 stores its top-k log-probs for the whole
            training set first (JSON / JSONL data, off-policy only) and frees it.
    """

    name: Literal["distill"] = "distill"
    teacher: str = path_field("", if_exists=True)
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = ranged(0.5, ge=0, le=1)
    temperature: float = ranged(1.0, gt=0)
    alpha: float = ranged(0.0, ge=0, le=1)
    on_policy: float = ranged(0.0, ge=0, le=1)
    max_new_tokens: int = ranged(64, ge=1)
    teacher_top_k: int = ranged(0, ge=0)

    def __post_init__(self) -> None:
        check_values(self, "stage")
        if not self.teacher:
            raise ValueError("stage.teacher is empty: name the teacher's model directory or run")
        if self.teacher_top_k and self.on_policy:
            raise ValueError("stage.teacher_top_k needs the teacher's scores of fixed answers; set on_policy: 0")

    def divergence_options(self) -> dict[str, Any]:
        return dict(divergence=self.divergence, beta=self.beta, temperature=self.temperature)


class Distill:
    """Train a student (connectors and LLM, or its LoRA adapters) on a teacher's distributions."""

    Options = DistillOptions
    trains = ("connectors", "llm")  # llm: the LoRA adapters when the model has them

    def __init__(self, options: DistillOptions) -> None:
        self.options = options

    def run(self, cfg: RunConfig, resume: bool = False, allow_changes: bool = False) -> dict[str, Any]:
        o = self.options
        samples = read_source(cfg.data.train, "data.train")
        if o.teacher_top_k and samples is None:
            raise DataError("stage.teacher_top_k needs data.train as a .json / .jsonl file, not shards")
        ctx = start_run(cfg, resume, allow_changes)
        model = build_model(ctx)
        teacher = load_teacher(o.teacher, model, ctx.accelerator.device)
        ctx.sharding.frozen(teacher.model)
        if cfg.data.packing and o.on_policy:
            raise ValueError(
                "data.packing: on-policy distillation rebuilds its batches from the student's answers; "
                "set data.packing: false"
            )
        pipeline = teacher.pipeline(model, cfg.data.max_length, cfg.data.packing)
        table = precompute_top_k(ctx, teacher, samples, pipeline, o.teacher_top_k) if o.teacher_top_k else None
        if table is not None:
            teacher.model.to("meta")  # frees its memory
        loss = DistillLoss(teacher, table, o.divergence_options(), o.alpha)
        prepare = None
        if o.on_policy:
            prepare = StudentAnswers(ctx, model, teacher, o.on_policy, o.max_new_tokens, o.temperature)
        parts = resolve_parts(cfg.train.trainable, self.trains, model)
        training = start_training(ctx, model, parts, training_loader(ctx, samples, pipeline), Evaluator(ctx, model))
        return train(training, supervised_step(loss, prepare))


class DistillLoss:
    """Summed per-token distillation loss of a micro-batch, with the teacher live or from a top-k table."""

    def __init__(self, teacher: Teacher, table: dict[str, TopK] | None, options: dict[str, Any], alpha: float):
        self.teacher, self.table, self.options, self.alpha = teacher, table, options, alpha

    def units(self, batch: DistillBatch) -> int:
        return batch.label_tokens()

    def __call__(self, model: torch.nn.Module, batch: DistillBatch) -> BatchLoss:
        out = model(batch.input_ids, batch.attention_mask, batch.media, batch.labels, segments=batch.segments)
        targets = out.targets  # [N]
        student = out.logits[:, : self.teacher.vocab]  # [N, V]
        if self.table is not None:
            teacher: torch.Tensor | TopK = stack_top_k([self.table[i] for i in batch.ids], student.device)
            teacher_best = teacher.indices[:, 0]
        else:
            teacher = self.teacher.logits(batch, targets.numel())
            teacher_best = teacher.argmax(-1)
        divergence = token_divergence(student, teacher, **self.options)  # [N]
        ce = F.cross_entropy(student.float(), targets, reduction="none")
        loss = (1.0 - self.alpha) * divergence + self.alpha * ce
        agreement = (student.detach().argmax(-1) == teacher_best).float()
        stats = {
            "distill/divergence": divergence.detach().sum(),
            "distill/ce": ce.detach().sum(),
            "distill/agreement": agreement.sum(),
        }
        return BatchLoss(loss_sum=loss.sum(), units=int(targets.numel()), stats=stats)


def stack_top_k(rows: list[TopK], device: torch.device) -> TopK:
    logprobs, indices = torch.cat([r.logprobs for r in rows]), torch.cat([r.indices for r in rows])
    return TopK(logprobs.to(device), indices.to(device).long())


@torch.no_grad()
def precompute_top_k(
    ctx: RunContext, teacher: Teacher, samples: list[Sample], pipeline: ConversationPipeline, k: int
) -> dict[str, TopK]:
    """The teacher's top-k log-probs at every answer token of every training sample, by sample id."""
    twice = sorted(i for i, n in Counter(s.id for s in samples).items() if n > 1)[:5]
    if twice:
        raise DataError(
            f"stage.teacher_top_k stores the teacher's scores by sample id, but data.train repeats ids "
            f"{twice}: give every sample its own id"
        )
    acc = ctx.accelerator
    loader, _ = make_loader(
        samples,
        pipeline,
        batch_size=ctx.cfg.train.batch_size,
        seed=ctx.cfg.seed,
        num_workers=worker_count(ctx.cfg.data.num_workers, acc.device),
    )
    table: dict[str, TopK] = {}
    for batch in loader:
        if batch.empty:
            continue
        batch = batch.to(acc.device)
        per_row = (batch.labels[:, 1:] != IGNORE).sum(-1).tolist()
        with acc.autocast():
            best = top_k(teacher.logits(batch, sum(per_row)), k)
        for sample_id, logprobs, indices in zip(
            batch.ids, best.logprobs.split(per_row), best.indices.split(per_row), strict=True
        ):
            table[sample_id] = TopK(logprobs.cpu(), indices.to(torch.int32).cpu())
    log.info("teacher top-%d stored for %d samples", k, len(table))
    return table
