"""On-policy distillation (GKD's λ): a fraction of micro-batches answered by the student itself, scored by the
teacher. Completions end at the model's end-of-sequence token (``mmpost.model.completions``).
"""

from __future__ import annotations

import dataclasses
import random

import torch

from mmpost.data.batches import ConversationBatch
from mmpost.interfaces import IGNORE
from mmpost.model.completions import completion_mask, eos_token_ids
from mmpost.model.lmm import LMM
from mmpost.stages.distill.teacher import DistillBatch, Teacher
from mmpost.training.context import RunContext
from mmpost.training.trainable import set_train_mode


class StudentAnswers:
    """Replaces the last answer of a micro-batch's samples by the student's own samples, with probability ``rate``.

    The prompt is everything before the last answer (earlier turns stay as context); the teacher's batch, when
    it has its own, gets the same answer tokens after its own prompt.
    """

    def __init__(
        self, ctx: RunContext, student: LMM, teacher: Teacher, rate: float, max_new_tokens: int, temperature: float
    ) -> None:
        self.student, self.teacher, self.rate = student, teacher, rate
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.rng = random.Random(ctx.cfg.seed + ctx.accelerator.process_index)

    @torch.no_grad()
    def __call__(self, batch: DistillBatch) -> DistillBatch:
        model = self.student
        if batch.empty or self.rng.random() >= self.rate:
            return batch
        pad = model.tokenizer.pad_token_id
        prompt_ids, prompt_mask = last_answer_prompts(batch, pad)
        model.eval()
        completions = model.generate(
            prompt_ids,
            prompt_mask,
            batch.media,
            max_new_tokens=self.max_new_tokens,
            do_sample=True,
            temperature=self.temperature,
            top_p=1.0,
        )
        set_train_mode(model)
        done = completion_mask(completions, eos_token_ids(model))
        teacher = batch.teacher
        if teacher is not None:
            teacher = teacher.to(prompt_ids.device)
            t_ids, t_mask = last_answer_prompts(teacher, pad)
            teacher = dataclasses.replace(teacher, **prompt_then_completion(t_ids, t_mask, completions, done, pad))
        return dataclasses.replace(
            batch, **prompt_then_completion(prompt_ids, prompt_mask, completions, done, pad), teacher=teacher
        )


def last_answer_prompts(batch: ConversationBatch, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``[B, P]`` ids and mask of each row up to the start of its last labelled span."""
    rows = []
    for ids, labels in zip(batch.input_ids, batch.labels, strict=True):
        labelled = (labels != IGNORE).nonzero().flatten().tolist()
        start = labelled[-1]
        while start - 1 in labelled:
            start -= 1
        rows.append(ids[:start])
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long, device=batch.input_ids.device)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


def prompt_then_completion(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completions: torch.Tensor, done: torch.Tensor, pad: int
) -> dict[str, torch.Tensor]:
    """Rows of prompt then completion (through its end-of-sequence token), labelled on the completion."""
    completion_ids = torch.where(done, completions, torch.full_like(completions, pad))
    return {
        "input_ids": torch.cat([prompt_ids, completion_ids], 1),
        "attention_mask": torch.cat([prompt_mask, done.long()], 1),
        "labels": torch.cat([torch.full_like(prompt_ids, IGNORE), torch.where(done, completions, IGNORE)], 1),
    }
