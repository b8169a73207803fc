"""From samples to batches: one pipeline per kind of batch (``mmpost.data.batches``).

A pipeline has two halves that the DataLoader runs: ``process(sample)`` in a worker (decode and preprocess
the media, tokenize the conversation) and ``collate(items)`` on the batch (pad the rows, stack the media). A
sample that cannot be used — corrupt media bytes, media that do not fit ``max_length``, nothing left to learn
from — comes out of ``process`` as ``Skipped``; ``collate`` drops and counts it, and the training loop stops
when the skipped fraction passes ``data.max_bad_fraction``.

- ``ConversationPipeline``: the whole conversation with labels on assistant turns, right-padded.
- ``PairPipeline``: the prompt continued by ``chosen`` and by ``rejected``, two labelled rows sharing one copy
  of the media.
- ``PromptPipeline``: the conversation up to (without) a final assistant turn, with the generation prompt,
  left-padded; the final turn is kept as the reference answer (``need_reference`` skips samples that lack one).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mmpost.data.batches import ConversationBatch, PairBatch, PromptBatch
from mmpost.data.chat import ChatEncoder, Encoded, Skipped, media_messages
from mmpost.data.feature_cache import CachingProcessor, FeatureCache
from mmpost.data.media import DECODERS
from mmpost.data.sample import Sample
from mmpost.interfaces import IGNORE, PLACEHOLDERS, MediaProcessor

if TYPE_CHECKING:
    from mmpost.model.lmm import LMM

TokenCounter = Callable[[str, tuple[int, ...]], int]


@dataclass
class Item:
    """One processed sample: its token rows (one, or two for a pair) and its preprocessed media."""

    id: str
    rows: list[Encoded]
    media: dict[str, list[torch.Tensor]]
    reference: str | None = None
    task: str = ""
    fields: dict[str, Any] = field(default_factory=dict)


class Pipeline:
    """What every pipeline shares: media decoding and preprocessing, the chat encoder, padding and collation.

    Args:
        chat: the tokenizer-side encoder.
        processors: per modality, the encoder's media processor.
        count_tokens: ``(modality, input_shape) -> M`` (the LMM's ``media_tokens``).
        pad_id: the tokenizer's pad id.
    """

    def __init__(
        self, chat: ChatEncoder, processors: Mapping[str, MediaProcessor], count_tokens: TokenCounter, pad_id: int
    ) -> None:
        self.chat = chat
        self.processors = dict(processors)
        self.count_tokens = count_tokens
        self.pad_id = pad_id

    @classmethod
    def for_model(
        cls, model: LMM, max_length: int, caches: Mapping[str, FeatureCache] | None = None, **options: Any
    ) -> Pipeline:
        """This pipeline for ``model``'s tokenizer, placeholders and encoders; media in ``caches`` (per modality)
        are read from there instead of being decoded (``mmpost.data.feature_cache``)."""
        media_text = {PLACEHOLDERS[m]: t.text for m, t in model.media_text.items()}
        chat = ChatEncoder(model.tokenizer, model.placeholder_ids, max_length, media_text, model.typed_chat)
        processors: dict[str, MediaProcessor] = {m: e.preprocessor() for m, e in model.encoders.items()}
        for modality, cache in (caches or {}).items():
            processors[modality] = CachingProcessor(processors[modality], cache)
        return cls(chat, processors, model.media_tokens, model.tokenizer.pad_token_id, **options)

    def __call__(self, sample: Sample) -> Item | Skipped:
        return self.process(sample)

    def process(self, sample: Sample) -> Item | Skipped:
        raise NotImplementedError

    def collate(self, items: Sequence[Item | Skipped]):
        raise NotImplementedError

    def prepare_media(self, sample: Sample) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[int]]] | Skipped:
        """The sample's media decoded and preprocessed, and how many tokens each becomes."""
        media: dict[str, list[torch.Tensor]] = {}
        texts = media_messages(sample.messages) if any(p.reads_text for p in self.processors.values()) else {}
        for modality, refs in sample.media.items():
            if not refs:
                continue
            if modality not in self.processors:
                return Skipped(sample.where(), f"it has {modality} input but the model has no {modality} encoder")
            processor, items = self.processors[modality], []
            for i, ref in enumerate(refs):
                hit = processor.cache.get(ref) if isinstance(processor, CachingProcessor) else None
                if hit is not None:  # read from the cache: the medium is not decoded
                    items.append(hit)
                    continue
                try:
                    raw = DECODERS[modality](ref)
                except Exception as err:  # any decoder failure means unusable bytes: skip and count
                    name = ref if not isinstance(ref, bytes) else f"{len(ref)} bytes"
                    return Skipped(sample.where(), f"cannot decode {modality} {name}: {type(err).__name__}: {err}")
                items.append(processor(raw, texts[modality][i]) if processor.reads_text else processor(raw))
            media[modality] = items
        counts = {m: [self.count_tokens(m, tuple(x.shape)) for x in items] for m, items in media.items()}
        return media, counts

    def media_and_tokens(
        self, sample: Sample, encode: Callable[[Sample, Mapping[str, Sequence[int]]], Encoded | Skipped]
    ) -> tuple[dict[str, list[torch.Tensor]], Encoded] | Skipped:
        """The sample's prepared media and its tokens by ``encode(sample, media token counts)``."""
        prepared = self.prepare_media(sample)
        if isinstance(prepared, Skipped):
            return prepared
        media, counts = prepared
        encoded = encode(sample, counts)
        return encoded if isinstance(encoded, Skipped) else (media, encoded)

    def pad(self, rows: Sequence[Encoded], side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[R, T]`` input ids, attention mask and labels of ``rows``, padded on ``side``."""
        width = max((len(e.input_ids) for e in rows), default=0)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, e in enumerate(rows):
            n = len(e.input_ids)
            cols = slice(width - n, width) if side == "left" else slice(0, n)
            input_ids[row, cols] = torch.tensor(e.input_ids)
            labels[row, cols] = torch.tensor(e.labels)
            attention_mask[row, cols] = 1
        return input_ids, attention_mask, labels

    def common(self, items: Sequence[Item | Skipped], side: str) -> dict[str, Any]:
        """The fields every batch kind has, plus the labels, from ``items`` padded on ``side``."""
        good = [x for x in items if not isinstance(x, Skipped)]
        input_ids, attention_mask, labels = self.pad([row for x in good for row in x.rows], side)
        media: dict[str, Any] = {}
        for modality, processor in self.processors.items():
            tensors = [t for x in good for t in x.media.get(modality, [])]
            if tensors:
                media[modality] = processor.collate(tensors)
        return {
            "ids": [x.id for x in good],
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "media": media,
            "drawn": len(items),
            "skipped": [f"{s.where}: {s.reason}" for s in items if isinstance(s, Skipped)],
            "labels": labels,
        }


class ConversationPipeline(Pipeline):
    """Whole conversations, labelled on every assistant turn; batches are right-padded.

    Args:
        packing: pack a batch's conversations into as few rows of at most ``max_length`` tokens as first-fit
            decreasing finds (``ConversationBatch.segments`` says which token is whose); the batch keeps its
            conversations and label tokens, with less padding.
    """

    def __init__(self, *args: Any, packing: bool = False) -> None:
        super().__init__(*args)
        self.packing = packing

    def process(self, sample: Sample) -> Item | Skipped:
        prepared = self.media_and_tokens(sample, self.chat.encode)
        if isinstance(prepared, Skipped):
            return prepared
        media, encoded = prepared
        return Item(sample.id, [encoded], media)

    def collate(self, items: Sequence[Item | Skipped]) -> ConversationBatch:
        if not self.packing:
            return ConversationBatch(**self.common(items, side="right"))
        good = [x for x in items if not isinstance(x, Skipped)]
        bins = first_fit_decreasing([len(x.rows[0].input_ids) for x in good], self.chat.max_length)
        ordered = [good[i] for row in bins for i in row]  # media are collated in this (row-major) order
        fields = self.common([*ordered, *(x for x in items if isinstance(x, Skipped))], side="right")
        rows, segments = [], []
        for row in bins:
            ids, labels, segment = [], [], []
            for number, i in enumerate(row, start=1):
                encoded = good[i].rows[0]
                ids += encoded.input_ids
                labels += [IGNORE, *encoded.labels[1:]]  # a sample's first token is predicted by no other sample
                segment += [number] * len(encoded.input_ids)
            rows.append(Encoded(ids, labels))
            segments.append(segment)
        fields["input_ids"], fields["attention_mask"], fields["labels"] = self.pad(rows, "right")
        width = fields["input_ids"].shape[1]
        fields["segments"] = torch.tensor([s + [0] * (width - len(s)) for s in segments], dtype=torch.long)
        fields["ids"] = [x.id for x in ordered]
        return ConversationBatch(**fields)


class PairPipeline(Pipeline):
    """A prompt continued by its ``chosen`` and by its ``rejected`` answer, labelled on that answer only.

    Batches are left-padded (see ``PairBatch``). A pair whose answers are identical prefers nothing and is
    skipped.
    """

    answers = ("chosen", "rejected")

    def process(self, sample: Sample) -> Item | Skipped:
        prepared = self.prepare_media(sample)
        if isinstance(prepared, Skipped):
            return prepared
        media, counts = prepared
        answers = []
        for key in self.answers:
            answer = pair_answer(sample.meta.get(key))
            if answer is None:
                return Skipped(sample.where(), f"no {key!r} answer (a string, or one assistant message)")
            answers.append(answer)
        if answers[0] == answers[1] and self.answers == PairPipeline.answers:
            return Skipped(sample.where(), "chosen and rejected are identical: the pair prefers nothing")
        if sample.messages and sample.messages[-1]["role"] == "assistant":
            return Skipped(sample.where(), "a preference prompt must end with a user turn; the answers follow it")
        rows = []
        for answer in answers:
            turn = Sample(
                sample.id,
                [*sample.messages, {"role": "assistant", "content": answer}],
                sample.media,
                sample.meta,
                sample.source,
            )
            encoded = self.chat.encode(turn, counts, last_turn_only=True)
            if isinstance(encoded, Skipped):
                return encoded
            rows.append(encoded)
        return Item(sample.id, rows, media)

    def collate(self, items: Sequence[Item | Skipped]) -> PairBatch:
        return PairBatch(**self.common(items, side="left"))


class UnpairedPipeline(PairPipeline):
    """KTO's rows: a prompt continued by its own ``completion`` and by ``kl_completion``, another example's, whose
    log-ratio estimates the KL baseline; laid out as ``PairBatch`` pairs (own row first, media once for both)."""

    answers = ("completion", "kl_completion")


class PromptPipeline(Pipeline):
    """Prompts to continue: the conversation without a final assistant turn, ending with the generation prompt.

    Batches are left-padded, so that generation continues every row at the right end.

    Args:
        need_reference: skip samples with no final assistant turn to compare a generated answer with.
    """

    def __init__(self, *args: Any, need_reference: bool = False) -> None:
        super().__init__(*args)
        self.need_reference = need_reference

    def process(self, sample: Sample) -> Item | Skipped:
        ends_with_answer = bool(sample.messages) and sample.messages[-1]["role"] == "assistant"
        if self.need_reference and not ends_with_answer:
            return Skipped(sample.where(), "no final assistant turn to compare a generated answer with")
        prepared = self.media_and_tokens(sample, self.chat.encode_prompt)
        if isinstance(prepared, Skipped):
            return prepared
        media, encoded = prepared
        prompt = next((m["content"] for m in reversed(sample.messages) if m["role"] == "user"), "")
        return Item(
            sample.id,
            [encoded],
            media,
            reference=sample.messages[-1]["content"] if ends_with_answer else None,
            task=str(sample.meta.get("task", "")),
            fields={**sample.meta, "id": sample.id, "prompt": prompt},
        )

    def collate(self, items: Sequence[Item | Skipped]) -> PromptBatch:
        good = [x for x in items if not isinstance(x, Skipped)]
        common = self.common(items, side="left")
        del common["labels"]
        return PromptBatch(
            **common,
            references=[x.reference for x in good],
            tasks=[x.task for x in good],
            fields=[x.fields for x in good],
        )


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` packed into bins of at most ``capacity`` (one bin for anything longer): longest
    first, each into the first bin it fits; each bin's indices in ascending order."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        place = next((b for b, free in enumerate(room) if free >= lengths[i]), None)
        if place is None:
            bins.append([i])
            room.append(capacity - lengths[i])
        else:
            bins[place].append(i)
            room[place] -= lengths[i]
    return [sorted(b) for b in bins]


def pair_answer(value: Any) -> str | None:
    """A preference answer as text: a string, or TRL's conversational form ``[{"role": "assistant", ...}]``."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        message = value[0]
        if message.get("role") == "assistant" and isinstance(message.get("content"), str):
            return message["content"]
    return None
