"""The teacher of white-box distillation: a frozen mmpost model whose next-token distributions a student learns.

Teacher and student must share a tokenizer (the distributions are over the same vocabulary). Their
encoders and connectors may differ: when they turn media into the same number of tokens with the same
preprocessing, the teacher reads the student's batch; otherwise every sample is also prepared for the
teacher (``TeacherPipeline``) and the two agree on the answer tokens, which are the same text.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mmpost.data.batches import ConversationBatch
from mmpost.data.chat import Skipped
from mmpost.data.pipeline import ConversationPipeline, Item
from mmpost.data.sample import Sample
from mmpost.model.build import load_lmm
from mmpost.model.format import resolve_model_dir
from mmpost.model.lmm import LMM
from mmpost.model.lora import merge_adapters

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


@dataclass(kw_only=True)
class DistillBatch(ConversationBatch):
    """The student's conversations, and the same samples prepared for a teacher that reads media otherwise.

    Attributes:
        teacher: the teacher's batch (same samples, same answer tokens), or None when it reads the student's.
    """

    teacher: ConversationBatch | None = None


@dataclass
class TeacherItem:
    student: Item
    teacher: Item


class TeacherPipeline:
    """Prepares each sample for the student and for the teacher; collates ``DistillBatch`` es."""

    def __init__(self, student: ConversationPipeline, teacher: ConversationPipeline | None) -> None:
        self.student, self.teacher = student, teacher

    def process(self, sample: Sample) -> Item | TeacherItem | Skipped:
        item = self.student.process(sample)
        if isinstance(item, Skipped) or self.teacher is None:
            return item
        theirs = self.teacher.process(sample)
        if isinstance(theirs, Skipped):
            return Skipped(theirs.where, f"for the teacher: {theirs.reason}")
        return TeacherItem(item, theirs)

    def collate(self, items: Sequence[Item | TeacherItem | Skipped]) -> DistillBatch:
        mine = [x.student if isinstance(x, TeacherItem) else x for x in items]
        theirs = [x.teacher for x in items if isinstance(x, TeacherItem)]
        if self.teacher is None:  # the student's batch (packed when the student's pipeline packs)
            batch = self.student.collate(mine)
            return DistillBatch(**{f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)})
        return DistillBatch(**self.student.common(mine, side="right"), teacher=self.teacher.collate(theirs))


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

    def pipeline(self, student: LMM, max_length: int, packing: bool = False) -> TeacherPipeline:
        """The data pipeline of the student's conversations, preparing them for the teacher too when it does
        not read the student's batches.

        Raises:
            ValueError: on ``packing`` with a teacher that does not read the student's batches.
        """
        if packing and not self.shares_batches:
            raise ValueError(
                "data.packing: the teacher reads its own batches (other media preprocessing or placeholders), which "
                "are not packed alike; set data.packing: false"
            )
        theirs = None if self.shares_batches else ConversationPipeline.for_model(self.model, max_length)
        return TeacherPipeline(ConversationPipeline.for_model(student, max_length, packing=packing), theirs)

    @torch.no_grad()
    def logits(self, batch: DistillBatch, num_tokens: int) -> torch.Tensor:
        """``[N, V]`` teacher logits predicting the batch's N answer tokens (rows as the student's)."""
        mine = batch if batch.teacher is None else batch.teacher.to(batch.input_ids.device)
        logits = self.model(mine.input_ids, mine.attention_mask, mine.media, mine.labels, segments=mine.segments).logits
        if logits.shape[0] != num_tokens:
            raise ValueError(
                f"the teacher sees {logits.shape[0]} answer tokens where the student sees {num_tokens} in samples "
                f"{batch.ids}: a sequence was cut at data.max_length for one of them; raise data.max_length"
            )
        return logits[:, : self.vocab].float()


def load_teacher(path: str | Path, student: LMM, device: torch.device) -> Teacher:
    """The teacher saved at ``path`` (a model directory or a run), in bfloat16 on a GPU and float32 on CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_lmm(resolve_model_dir(path, what="stage.teacher"), dtype=dtype)
    model.llm = merge_adapters(model.llm)
    teacher = Teacher(model, student, device)
    log.info("teacher %s (%s), %s the student's batches", path, dtype, "reads" if teacher.shares_batches else "not")
    return teacher
