"""Knowledge distillation: a student LMM learns a frozen teacher LMM's next-token distributions.

White-box, on the answer tokens of instruction data: ``(1 - alpha) * divergence + alpha * cross-entropy``
per token, the divergence being forward KL, reverse KL or GKD's generalised JSD at a temperature
(``mmpost.losses.distill``), summed over answer tokens and divided by their number as in sft. The student
may have a smaller LLM and another encoder or connector (``mmpost.training.teacher``); the tokenizer must
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
import random
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F

from mmpost.config import RunConfig
from mmpost.data.loader import make_loader, read_source
from mmpost.data.sample import DataError, Sample
from mmpost.losses.distill import DIVERGENCES, TopK, token_divergence, top_k
from mmpost.model.lmm import IGNORE, LMM, LossOutput
from mmpost.train import fit
from mmpost.training.evaluate import to_device
from mmpost.training.parts import set_train_mode
from mmpost.training.rollout import completion_mask, eos_token_ids
from mmpost.training.run import RunContext, build_model, start_run
from mmpost.training.teacher import Teacher, load_teacher

log = logging.getLogger("mmpost")


class Distill:
    """Train a student (connectors and LLM, or its LoRA adapters) on a teacher's distributions.

    Args:
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

    def __init__(
        self,
        teacher: str = "",
        divergence: str = "forward_kl",
        beta: float = 0.5,
        temperature: float = 1.0,
        alpha: float = 0.0,
        on_policy: float = 0.0,
        max_new_tokens: int = 64,
        teacher_top_k: int = 0,
    ) -> None:
        if not teacher:
            raise ValueError("stage.teacher is empty: name the teacher's model directory or run")
        if divergence not in DIVERGENCES:
            raise ValueError(f"stage.divergence must be one of {', '.join(DIVERGENCES)}; got {divergence!r}")
        for key, value in (("beta", beta), ("alpha", alpha), ("on_policy", on_policy)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"stage.{key} must lie in [0, 1]; got {value}")
        if not temperature > 0:
            raise ValueError(f"stage.temperature must be positive; got {temperature}")
        if teacher_top_k < 0 or max_new_tokens < 1:
            raise ValueError(f"stage.teacher_top_k must be >= 0 and stage.max_new_tokens >= 1; got {teacher_top_k}, "
                             f"{max_new_tokens}")  # fmt: skip
        if teacher_top_k and on_policy:
            raise ValueError("stage.teacher_top_k needs the teacher's scores of fixed answers; set on_policy: 0")
        self.teacher_path, self.top_k = teacher, teacher_top_k
        self.options = dict(divergence=divergence, beta=beta, temperature=temperature)
        self.alpha, self.on_policy, self.max_new_tokens = alpha, on_policy, max_new_tokens

    def default_trainable(self, model: LMM) -> list[str]:
        return ["connectors", "llm.lora" if model.has_lora else "llm"]

    def run(self, cfg: RunConfig, resume: bool = False, allow_changes: bool = False) -> dict[str, Any]:
        samples = read_source(cfg.data.train, "data.train")
        if self.top_k and samples is None:
            raise DataError("stage.teacher_top_k needs data.train as a .json / .jsonl file, not shards")
        ctx = start_run(cfg, resume, allow_changes)
        model = build_model(ctx)
        teacher = load_teacher(self.teacher_path, model, ctx.accelerator.device)
        pipeline = teacher.pipeline(model, cfg.data.max_length, "train")
        table = precompute_top_k(ctx, model, teacher, samples, pipeline, self.top_k) if self.top_k else None
        if table is not None:
            teacher.model.to("meta")  # frees its memory
        loss = DistillLoss(teacher, table, self.options, self.alpha)
        prepare = None
        if self.on_policy:
            prepare = OnPolicy(ctx, teacher, self.on_policy, self.max_new_tokens, self.options["temperature"])
        parts = cfg.train.trainable or self.default_trainable(model)
        return fit(ctx, model, parts, loss, samples=samples, pipeline=pipeline, prepare=prepare)


class DistillLoss:
    """Summed per-token distillation loss of a micro-batch, with the teacher live or from a top-k table."""

    def __init__(self, teacher: Teacher, table: dict[str, TopK] | None, options: dict[str, Any], alpha: float):
        self.teacher, self.table, self.options, self.alpha = teacher, table, options, alpha

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        labels = batch["labels"]
        targets = labels[:, 1:][labels[:, 1:] != IGNORE]  # [N]
        student = model(batch["input_ids"], batch["attention_mask"], batch["media"], labels, label_logits=True)
        student = student[:, : self.teacher.vocab]  # [N, V]
        if self.table is not None:
            teacher: torch.Tensor | TopK = stack_top_k([self.table[i] for i in batch["ids"]], student.device)
            teacher_best = teacher.indices[:, 0]
        else:
            teacher = self.teacher.logits(batch, targets.numel())
            teacher_best = teacher.argmax(-1)
        divergence = token_divergence(student, teacher, **self.options)  # [N]
        ce = F.cross_entropy(student.float(), targets, reduction="none")
        loss = (1.0 - self.alpha) * divergence + self.alpha * ce
        agreement = (student.detach().argmax(-1) == teacher_best).float()
        stats = {"distill/divergence": divergence.detach().sum(), "distill/ce": ce.detach().sum(),
                 "distill/agreement": agreement.sum()}  # fmt: skip
        return LossOutput(loss_sum=loss.sum(), num_tokens=int(targets.numel()), stats=stats)


def stack_top_k(rows: list[TopK], device: torch.device) -> TopK:
    logprobs, indices = torch.cat([r.logprobs for r in rows]), torch.cat([r.indices for r in rows])
    return TopK(logprobs.to(device), indices.to(device).long())


@torch.no_grad()
def precompute_top_k(
    ctx: RunContext, model: LMM, teacher: Teacher, samples: list[Sample], pipeline: Any, k: int
) -> dict[str, TopK]:
    """The teacher's top-k log-probs at every answer token of every training sample, by sample id."""
    twice = sorted(i for i, n in Counter(s.id for s in samples).items() if n > 1)[:5]
    if twice:
        raise DataError(f"stage.teacher_top_k stores the teacher's scores by sample id, but data.train repeats ids "
                        f"{twice}: give every sample its own id")  # fmt: skip
    acc = ctx.accelerator
    loader, _ = make_loader(samples, ctx.cfg.data.train, model, ctx.cfg.data, ctx.cfg.train.batch_size, "train",
                            0, 1, ctx.cfg.seed, shuffle=False, pipeline=pipeline)  # fmt: skip
    table: dict[str, TopK] = {}
    for batch in loader:
        if not batch["ids"]:
            continue
        batch = to_device(batch, acc.device)
        per_row = (batch["labels"][:, 1:] != IGNORE).sum(-1).tolist()
        with acc.autocast():
            best = top_k(teacher.logits(batch, sum(per_row)), k)
        for sample_id, logprobs, indices in zip(batch["ids"], best.logprobs.split(per_row),
                                                best.indices.split(per_row), strict=True):  # fmt: skip
            table[sample_id] = TopK(logprobs.cpu(), indices.to(torch.int32).cpu())
    log.info("teacher top-%d stored for %d samples", k, len(table))
    return table


class OnPolicy:
    """Replaces the last answer of a micro-batch's samples by the student's own samples, with probability ``rate``.

    The prompt is everything before the last answer (earlier turns stay as context); the teacher's batch, when
    it has its own, gets the same answer tokens after its own prompt.
    """

    def __init__(self, ctx: RunContext, teacher: Teacher, rate: float, max_new_tokens: int, temperature: float):
        self.ctx, self.teacher, self.rate = ctx, teacher, rate
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.rng = random.Random(ctx.cfg.seed + ctx.accelerator.process_index)

    @torch.no_grad()
    def __call__(self, model: LMM, batch: dict[str, Any]) -> dict[str, Any]:
        if not batch["ids"] or self.rng.random() >= self.rate:
            return batch
        pad = model.tokenizer.pad_token_id
        prompt_ids, prompt_mask = last_answer_prompts(batch, pad)
        model.eval()
        completions = model.generate(prompt_ids, prompt_mask, batch["media"], max_new_tokens=self.max_new_tokens,
                                     do_sample=True, temperature=self.temperature, top_p=1.0)  # fmt: skip
        set_train_mode(model)
        done = completion_mask(completions, eos_token_ids(model))
        out = {**batch, **continued(prompt_ids, prompt_mask, completions, done, pad)}
        if "teacher" in batch:
            theirs = to_device(batch["teacher"], prompt_ids.device)
            t_ids, t_mask = last_answer_prompts(theirs, pad)
            out["teacher"] = {**theirs, **continued(t_ids, t_mask, completions, done, pad)}
        return out


def last_answer_prompts(batch: dict[str, Any], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``[B, P]`` ids and mask of each row up to the start of its last labelled span."""
    rows = []
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        labelled = (labels != IGNORE).nonzero().flatten().tolist()
        start = labelled[-1]
        while start - 1 in labelled:
            start -= 1
        rows.append(ids[:start])
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long, device=batch["input_ids"].device)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


def continued(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completions: torch.Tensor, done: torch.Tensor, pad: int
) -> dict[str, torch.Tensor]:
    """Rows of prompt then completion (through its end-of-sequence token), labelled on the completion."""
    completion_ids = torch.where(done, completions, torch.full_like(completions, pad))
    return {
        "input_ids": torch.cat([prompt_ids, completion_ids], 1),
        "attention_mask": torch.cat([prompt_mask, done.long()], 1),
        "labels": torch.cat([torch.full_like(prompt_ids, IGNORE), torch.where(done, completions, IGNORE)], 1),
    }
