"""The teacher of white-box distillation: a frozen mmpost model whose next-token distributions a student learns.

Teacher and student must share a tokenizer (the distributions are over the same vocabulary). Their
encoders and connectors may differ: when they turn media into the same number of tokens with the same
preprocessing, the teacher reads the student's batch; otherwise every sample is also prepared for the
teacher (``TeacherPipeline``) and the two agree on the answer tokens, which are the same text.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmpost.data.chat import Skipped
from mmpost.data.dataset import Collator, SampleProcessor
from mmpost.data.loader import make_pipeline
from mmpost.data.sample import Sample
from mmpost.model.io import load_lmm, resolve_model_dir
from mmpost.model.lmm import LMM
from mmpost.training.evaluate import to_device

log = logging.getLogger("mmpost")


class TokenizerMismatch(ValueError):
    """Teacher and student tokenize differently, so their next-token distributions cannot be compared."""


def check_tokenizers(teacher: LMM, student: LMM) -> None:
    """Raises TokenizerMismatch naming both vocabulary sizes unless the two tokenizers map text alike."""
    t_vocab, s_vocab = teacher.tokenizer.get_vocab(), student.tokenizer.get_vocab()
    if t_vocab != s_vocab:
        differ = "" if len(t_vocab) != len(s_vocab) else " (the same size, but other tokens or ids)"
        raise TokenizerMismatch(
            f"teacher and student tokenizers differ: the teacher's vocabulary has {len(t_vocab)} tokens, the "
            f"student's {len(s_vocab)}{differ}. Logit distillation needs one tokenizer; for models with different "
            "tokenizers, let the teacher write answers with `mmpost distill-data` and train the student with sft"
        )


def reads_alike(teacher: LMM, student: LMM) -> bool:
    """True when the teacher can read the student's batches: same media preprocessing and token counts."""
    if sorted(teacher.modalities) != sorted(student.modalities):
        return False
    for m in teacher.modalities:
        t_enc, s_enc = teacher.encoders[m], student.encoders[m]
        if type(t_enc) is not type(s_enc) or t_enc.spec() != s_enc.spec():
            return False
        t_con, s_con = teacher.connectors[m], student.connectors[m]
        if any(t_con.num_tokens(n) != s_con.num_tokens(n) for n in (1, 16, 64, 257)):
            return False
    return True


class TeacherPipeline:
    """Prepares each sample for the student and for the teacher; the teacher's batch rides in ``batch["teacher"]``."""

    def __init__(self, student: tuple[SampleProcessor, Collator], teacher: tuple[SampleProcessor, Collator]) -> None:
        (self.process_s, self.collate_s), (self.process_t, self.collate_t) = student, teacher

    def process(self, sample: Sample) -> dict[str, Any] | Skipped:
        item = self.process_s(sample)
        if isinstance(item, Skipped):
            return item
        teacher_item = self.process_t(sample)
        if isinstance(teacher_item, Skipped):
            return Skipped(teacher_item.where, f"for the teacher: {teacher_item.reason}")
        return {**item, "teacher": teacher_item}

    def collate(self, items: Sequence[dict[str, Any] | Skipped]) -> dict[str, Any]:
        batch = self.collate_s(items)
        batch["teacher"] = self.collate_t([x["teacher"] for x in items if not isinstance(x, Skipped)])
        return batch


class Teacher:
    """A frozen teacher: its logits at the answer tokens of a (student) batch.

    Args:
        model: the teacher LMM (moved to ``device``, eval mode, no gradients).
        student: the model being trained, to check the tokenizer and choose how batches are shared.
    """

    def __init__(self, model: LMM, student: LMM, device: torch.device) -> None:
        check_tokenizers(model, student)
        self.model = model.to(device).eval().requires_grad_(False)
        self.vocab = len(student.tokenizer)
        self.shares_batches = reads_alike(model, student)

    def pipeline(self, student: LMM, max_length: int, mode: str) -> TeacherPipeline | None:
        """The data pipeline that prepares samples for both models, or None when the student's batch will do."""
        if self.shares_batches:
            return None
        return TeacherPipeline(make_pipeline(student, max_length, mode), make_pipeline(self.model, max_length, mode))

    @torch.no_grad()
    def logits(self, batch: dict[str, Any], num_tokens: int) -> torch.Tensor:
        """``[N, V]`` teacher logits predicting the batch's N answer tokens (rows as the student's)."""
        mine = batch if self.shares_batches else to_device(batch["teacher"], batch["input_ids"].device)
        logits = self.model(mine["input_ids"], mine["attention_mask"], mine["media"], mine["labels"], label_logits=True)
        if logits.shape[0] != num_tokens:
            raise ValueError(
                f"the teacher sees {logits.shape[0]} answer tokens where the student sees {num_tokens} in samples "
                f"{batch['ids']}: a sequence was cut at data.max_length for one of them; raise data.max_length"
            )
        return logits[:, : self.vocab].float()


def load_teacher(path: str | Path, student: LMM, device: torch.device) -> Teacher:
    """The teacher saved at ``path`` (a model directory or a run), in bfloat16 on a GPU and float32 on CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_lmm(resolve_model_dir(path, what="stage.teacher"), dtype=dtype)
    if model.has_lora:
        model.llm = model.llm.merge_and_unload()
    teacher = Teacher(model, student, device)
    log.info("teacher %s (%s), %s the student's batches", path, dtype, "reads" if teacher.shares_batches else "not")
    return teacher
