"""Conversations to token ids: chat template, assistant-only labels, placeholder expansion, truncation.

The LLM tokenizer's own chat template renders the text. Assistant spans are found by rendering
each prefix of the conversation: the text between "prefix up to this turn with the generation
prompt" and "prefix including this turn" is the assistant's reply plus the template's end-of-turn
marker, which is labelled too so the model learns to stop.

Each placeholder token (``<image>``) is expanded to the connector's token count ``M`` after
tokenisation. Sequences longer than ``max_length`` lose text from the end, never media tokens; a
sample whose media do not fit is skipped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from mmpost.data.sample import DataError, Sample
from mmpost.interfaces import IGNORE, PLACEHOLDERS


@dataclass
class Skipped:
    """A sample that was not used, and why (counted in the run's metrics)."""

    where: str
    reason: str


@dataclass
class Encoded:
    """Token ids of one sample with media placeholders expanded.

    Attributes:
        input_ids: token ids, each medium's placeholder repeated ``M`` times.
        labels: the target id at assistant positions, ``IGNORE`` elsewhere (aligned with input_ids).
    """

    input_ids: list[int]
    labels: list[int]


_MEDIA_SPLIT = re.compile("(" + "|".join(re.escape(p) for p in PLACEHOLDERS.values()) + ")\n?")
_MODALITY_OF = {p: m for m, p in PLACEHOLDERS.items()}


def typed_parts(content: str) -> list[dict[str, str]]:
    """``"<image>\nWhat is it?"`` as typed content: ``[{"type": "image"}, {"type": "text", "text": "What is it?"}]``."""
    parts: list[dict[str, str]] = []
    for i, piece in enumerate(_MEDIA_SPLIT.split(content)):
        if i % 2:
            parts.append({"type": _MODALITY_OF[piece]})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def media_messages(messages: Sequence[Mapping[str, str]]) -> dict[str, list[str]]:
    """Per modality, the text of the message holding each medium (in placeholder order), as ``typed_parts`` splits
    it: what a processor with ``reads_text`` reads beside the medium."""
    texts: dict[str, list[str]] = {}
    for message in messages:
        parts = typed_parts(message["content"])
        text = "".join(part["text"] for part in parts if part["type"] == "text")
        for part in parts:
            if part["type"] != "text":
                texts.setdefault(part["type"], []).append(text)
    return texts


class ChatEncoder:
    """Renders and tokenizes conversations for one model.

    Args:
        tokenizer: the LLM's (fast) tokenizer, with a chat template.
        placeholder_ids: per modality, the id of its placeholder token.
        max_length: longest sequence in tokens, media included.
        media_text: per data placeholder (``<image>``), the text the model writes a medium as, when it is not
            the placeholder itself (``MediaText.text``).
        typed_content: the template reads transformers' typed content (``[{"type": "image"}, {"type": "text",
            "text": ...}]``, as released processors' templates do), so each message's text is split into those
            parts at the placeholders (``PLACEHOLDERS``) before rendering, and the template writes each medium.
            A newline right after a placeholder is the separator data writes (``<image>\nQuestion``) and is
            dropped, as the template adds its own.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        placeholder_ids: Mapping[str, int],
        max_length: int,
        media_text: Mapping[str, str] | None = None,
        typed_content: bool = False,
    ):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "the LLM's tokenizer has no chat template; set model.llm.chat_template to a Jinja template"
            )
        if not tokenizer.is_fast:
            raise ValueError("mmpost needs a fast tokenizer (offsets are used to find assistant tokens)")
        self.tokenizer = tokenizer
        self.placeholder_ids = dict(placeholder_ids)
        self.max_length = max_length
        self.media_text = {k: v for k, v in (media_text or {}).items() if k != v}
        self.typed_content = typed_content

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
        if self.typed_content:
            messages = [{**m, "content": typed_parts(m["content"])} for m in messages]
        elif self.media_text:
            messages = [{**m, "content": self.model_text(m["content"])} for m in messages]
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def model_text(self, content: str) -> str:
        """``content`` with every data placeholder written as the model writes that medium."""
        for placeholder, text in self.media_text.items():
            content = content.replace(placeholder, text)
        return content

    def assistant_spans(self, sample: Sample) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans of assistant replies in it."""
        messages = sample.messages
        text = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(self.render(messages[:i], add_generation_prompt=True))
            upto = self.render(messages[: i + 1])
            if not text.startswith(upto) or start > len(upto):
                raise DataError(
                    f"{sample.where()}: the chat template does not render the conversation prefix-consistently, "
                    "so assistant turns cannot be located; use a template without history-dependent rewriting"
                )
            spans.append((start, len(upto)))
        return text, spans

    def encode(
        self, sample: Sample, media_tokens: Mapping[str, Sequence[int]], last_turn_only: bool = False
    ) -> Encoded | Skipped:
        """Tokenizes a training sample; ``media_tokens[modality][k]`` is ``M`` for its k-th medium.

        ``last_turn_only`` labels only the final assistant turn (a preference pair's answer), not earlier ones.
        """
        text, spans = self.assistant_spans(sample)
        if last_turn_only:
            spans = spans[-1:]
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, labels = [], []
        for token_id, (start, _) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
            in_reply = any(s <= start < e for s, e in spans)
            ids.append(token_id)
            labels.append(token_id if in_reply else IGNORE)
        ids, labels = self.expand(ids, labels, media_tokens, sample)
        return self.truncate(ids, labels, sample, need_labels=True)

    def encode_prompt(self, sample: Sample, media_tokens: Mapping[str, Sequence[int]]) -> Encoded | Skipped:
        """Tokenizes the conversation up to (without) a final assistant turn, ending with the generation prompt."""
        messages = sample.messages
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        text = self.render(messages, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids, labels = self.expand(ids, [IGNORE] * len(ids), media_tokens, sample)
        return self.truncate(ids, labels, sample, need_labels=False, keep="end")

    def expand(
        self, ids: list[int], labels: list[int], media_tokens: Mapping[str, Sequence[int]], sample: Sample
    ) -> tuple[list[int], list[int]]:
        """Repeats each placeholder id ``M`` times (the connector's token count for that medium)."""
        by_id = {tid: modality for modality, tid in self.placeholder_ids.items()}
        seen = dict.fromkeys(self.placeholder_ids, 0)
        out_ids: list[int] = []
        out_labels: list[int] = []
        for token_id, label in zip(ids, labels, strict=True):
            modality = by_id.get(token_id)
            if modality is None:
                out_ids.append(token_id)
                out_labels.append(label)
                continue
            counts = media_tokens.get(modality, ())
            if seen[modality] >= len(counts):
                raise DataError(f"{sample.where()}: more {modality} placeholders than {modality}s after tokenization")
            m = counts[seen[modality]]
            seen[modality] += 1
            out_ids += [token_id] * m
            out_labels += [IGNORE] * m
        for modality, n in seen.items():
            if n != len(media_tokens.get(modality, ())):
                raise DataError(
                    f"{sample.where()}: {n} {modality} placeholder token(s) after tokenization but "
                    f"{len(media_tokens.get(modality, ()))} {modality}(s)"
                )
        return out_ids, out_labels

    def truncate(
        self, ids: list[int], labels: list[int], sample: Sample, need_labels: bool, keep: str = "start"
    ) -> Encoded | Skipped:
        """Cuts text to ``max_length`` without cutting through media tokens.

        ``keep="start"`` (training) drops text from the end; ``keep="end"`` (prompts) drops text from
        the start, so the question and the generation prompt survive.
        """
        n = len(ids)
        if n > self.max_length:
            media = [i for i, t in enumerate(ids) if t in self.placeholder_ids.values()]
            if keep == "start":
                if media and media[-1] >= self.max_length:
                    return Skipped(sample.where(), f"its media tokens end at {media[-1] + 1} > max_length")
                ids, labels = ids[: self.max_length], labels[: self.max_length]
            else:
                cut = n - self.max_length
                if media and media[0] < cut:
                    return Skipped(sample.where(), f"prompt of {n} tokens with media does not fit max_length")
                ids, labels = ids[cut:], labels[cut:]
        if need_labels and all(label == IGNORE for label in labels[1:]):
            return Skipped(sample.where(), "no assistant tokens left to learn from (after truncation)")
        return Encoded(input_ids=ids, labels=labels)
