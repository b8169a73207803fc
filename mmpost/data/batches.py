"""The batches the data pipeline hands to the model, one dataclass per kind.

- ``ConversationBatch``: whole conversations, labelled on assistant turns; right-padded (align, sft, distill).
- ``PairBatch``: a prompt continued by a chosen and by a rejected answer, two rows per sample (dpo).
- ``PromptBatch``: prompts to continue, left-padded so that generation goes on at the right end (evaluation,
  grpo), with what scoring a continuation needs.

Every batch also says how many samples were drawn for it and why the skipped ones were skipped, so the
training loop can count them; ``to(device)`` moves its tensors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from accelerate.utils import send_to_device

from mmpost.interfaces import IGNORE, MediaBatch

B = TypeVar("B", bound="Batch")


@dataclass(kw_only=True)
class Batch:
    """What every kind of batch holds.

    Attributes:
        ids: the ids of the samples whose rows are here, in row order (a sample may have several rows).
        input_ids: ``[R, T]`` token ids, each medium's placeholder repeated to its token count.
        attention_mask: ``[R, T]`` 1 on real tokens, 0 on padding.
        media: per modality, the collated inputs of the samples' media, in sample order.
        drawn: samples drawn for this batch, the skipped ones included.
        skipped: for each skipped sample, where it is and why (``sample 'x' of train.json: cannot decode ...``).
    """

    ids: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    media: dict[str, MediaBatch]
    drawn: int
    skipped: list[str]

    @property
    def empty(self) -> bool:
        """True when every sample drawn for it was skipped."""
        return not self.ids

    def to(self: B, device: torch.device | str) -> B:
        """A copy with every tensor (and every nested batch) on ``device``."""
        moved: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                moved[f.name] = value.to(device)
            elif isinstance(value, Batch):
                moved[f.name] = value.to(device)
            elif f.name == "media":
                moved[f.name] = send_to_device(value, device)  # tensors, or dicts of them for audio
        return dataclasses.replace(self, **moved)


@dataclass(kw_only=True)
class ConversationBatch(Batch):
    """Conversations, right-padded; or packed, several conversations per row (``data.packing``).

    Attributes:
        labels: ``[R, T]`` the token at assistant positions, ``IGNORE`` elsewhere (aligned with ``input_ids``).
        segments: ``[R, T]`` for packed rows, the conversation each token belongs to (1, 2, ... within a row, 0 on
            padding); None when each row holds one conversation.
    """

    labels: torch.Tensor
    segments: torch.Tensor | None = None

    def label_tokens(self) -> int:
        """Label tokens that a next-token loss predicts (the first column predicts nothing)."""
        return int((self.labels[:, 1:] != IGNORE).sum())


@dataclass(kw_only=True)
class PairBatch(ConversationBatch):
    """Preference pairs: rows ``2i`` and ``2i + 1`` are sample ``i``'s prompt continued by its chosen and by its
    rejected answer, labelled on that answer only; the media are there once per pair (``media_repeat=2``).

    Left-padded, as they have always been: the two rows of a pair then end in the same column.
    """

    @property
    def pairs(self) -> int:
        return len(self.ids)


@dataclass(kw_only=True)
class PromptBatch(Batch):
    """Prompts ending with the generation prompt, left-padded.

    Attributes:
        references: per row, the final assistant turn the prompt was cut before (None when it had none).
        tasks: per row, the sample's ``task`` field ("" when it has none), for per-task accuracy.
        fields: per row, the sample's fields (``answer`` and the others, its ``id`` and its last user turn as
            ``prompt``), for reward functions.
    """

    references: list[str | None]
    tasks: list[str]
    fields: list[dict[str, Any]]
