"""Datasets that decode media, preprocess them with the encoders' processors and tokenize, in workers.

A sample that cannot be used — corrupt media bytes, media that do not fit ``max_length``, nothing
left to learn from — comes out as ``Skipped``; the collator drops and counts it, and the training
loop stops when the skipped fraction passes ``data.max_bad_fraction``.

JSON data is a map-style dataset (exact resume: the sampler skips batches without loading them);
webdataset shards are an iterable one, split across processes and workers by webdataset.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch
from PIL import Image

from mmpost.data.chat import ChatEncoder, Encoded, Skipped
from mmpost.data.sample import Sample
from mmpost.interfaces import Audio, MediaProcessor

TokenCounter = Callable[[str, tuple[int, ...]], int]


def decode_image(ref: Path | bytes) -> Image.Image:
    """Opens an image file or bytes fully (PIL is lazy; decoding errors must surface here), as 8-bit RGB.

    Grey images of more than 8 bits (16-bit PNG or TIFF: PIL modes ``I;16*``, ``I``, ``F``) are scaled to 8 bits:
    PIL's own ``convert("RGB")`` clips every value above 255, which turns them white.
    """
    with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as img:
        img.load()
        if img.mode.startswith("I") or img.mode == "F":
            return Image.fromarray(to_8_bit(np.asarray(img)), mode="L").convert("RGB")
        return img.convert("RGB")


def to_8_bit(values: np.ndarray) -> np.ndarray:
    """Grey levels of a high-bit-depth image as uint8: integers map 0..65535 onto 0..255 (32-bit integers beyond
    65535 map their own maximum onto 255); floats within [0, 1] are fractions, other floats their own range."""
    floating = np.issubdtype(values.dtype, np.floating)
    values = values.astype(np.float64)
    peak = float(values.max()) if values.size else 0.0
    if floating:
        top = 1.0 if peak <= 1.0 and (not values.size or values.min() >= 0) else max(peak, 1e-12)
    else:
        top = max(65535.0, peak)
    return np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)


def decode_audio(ref: Path | bytes) -> Audio:
    """Reads a wav / flac file or its bytes: float32, channels averaged to mono, at the file's own rate.

    soundfile (libsndfile) reads it, not ``torchaudio.load``, which needs torchcodec and FFmpeg. Any rate is
    accepted; the encoders' processors resample.

    Raises:
        soundfile.LibsndfileError: on bytes libsndfile cannot read.
        ValueError: on a clip with no samples.
    """
    data, rate = soundfile.read(io.BytesIO(ref) if isinstance(ref, bytes) else ref, dtype="float32", always_2d=True)
    if data.shape[0] == 0:
        raise ValueError("the clip has no samples")
    return Audio(waveform=torch.from_numpy(data.mean(axis=1, dtype="float32")), rate=int(rate))  # [samples]


DECODERS: dict[str, Callable[[Path | bytes], Any]] = {"image": decode_image, "audio": decode_audio}


class SampleProcessor:
    """Turns a ``Sample`` into model inputs: decoded and preprocessed media plus token ids.

    Args:
        chat: the tokenizer-side encoder.
        processors: per modality, the encoder's media processor.
        count_tokens: ``(modality, input_shape) -> M`` (the LMM's ``media_tokens``).
        mode: "train" (ids with labels), "generate" (prompt up to the final assistant turn, which is kept
            as the reference answer), "prompt" (the whole conversation as a prompt, with the sample's fields
            for reward functions) or "pair" (the conversation continued by ``chosen`` and by ``rejected``: two
            labelled sequences sharing one copy of the media).
    """

    def __init__(
        self,
        chat: ChatEncoder,
        processors: Mapping[str, MediaProcessor],
        count_tokens: TokenCounter,
        mode: str = "train",
    ) -> None:
        self.chat = chat
        self.processors = dict(processors)
        self.count_tokens = count_tokens
        self.mode = mode

    def __call__(self, sample: Sample) -> dict[str, Any] | Skipped:
        if self.mode == "generate" and (not sample.messages or sample.messages[-1]["role"] != "assistant"):
            return Skipped(sample.where(), "no final assistant turn to compare a generated answer with")
        media: dict[str, list[torch.Tensor]] = {}
        for modality, refs in sample.media.items():
            if not refs:
                continue
            if modality not in self.processors:
                return Skipped(sample.where(), f"it has {modality} input but the model has no {modality} encoder")
            items = []
            for ref in refs:
                try:
                    raw = DECODERS[modality](ref)
                except Exception as err:  # any decoder failure means unusable bytes: skip and count
                    name = ref if isinstance(ref, Path) else f"{len(ref)} bytes"
                    return Skipped(sample.where(), f"cannot decode {modality} {name}: {type(err).__name__}: {err}")
                items.append(self.processors[modality](raw))
            media[modality] = items
        counts = {m: [self.count_tokens(m, tuple(x.shape)) for x in items] for m, items in media.items()}
        if self.mode == "pair":
            encoded = self.encode_pair(sample, counts)
        elif self.mode == "train":
            encoded = self.chat.encode(sample, counts)
        else:
            encoded = self.chat.encode_prompt(sample, counts)
        if isinstance(encoded, Skipped):
            return encoded
        out: dict[str, Any] = {"id": sample.id, "encoded": encoded, "media": media}
        if self.mode == "generate":
            out["reference"] = sample.messages[-1]["content"]
            out["task"] = str(sample.meta.get("task", ""))
        if self.mode == "prompt":
            prompt = next((m["content"] for m in reversed(sample.messages) if m["role"] == "user"), "")
            out["fields"] = {**sample.meta, "id": sample.id, "prompt": prompt}
        return out

    def encode_pair(self, sample: Sample, counts: Mapping[str, Sequence[int]]) -> list[Encoded] | Skipped:
        """The prompt continued by the chosen and by the rejected answer, labelled on that answer only."""
        answers = []
        for key in ("chosen", "rejected"):
            answer = pair_answer(sample.meta.get(key))
            if answer is None:
                return Skipped(sample.where(), f"no {key!r} answer (a string, or one assistant message)")
            answers.append(answer)
        if answers[0] == answers[1]:
            return Skipped(sample.where(), "chosen and rejected are identical: the pair prefers nothing")
        if sample.messages and sample.messages[-1]["role"] == "assistant":
            return Skipped(sample.where(), "a preference prompt must end with a user turn; the answers follow it")
        pair = []
        for answer in answers:
            turn = Sample(sample.id, [*sample.messages, {"role": "assistant", "content": answer}], sample.media,
                          sample.meta, sample.source)  # fmt: skip
            encoded = self.chat.encode(turn, counts, last_turn_only=True)
            if isinstance(encoded, Skipped):
                return encoded
            pair.append(encoded)
        return pair


def pair_answer(value: Any) -> str | None:
    """A preference answer as text: a string, or TRL's conversational form ``[{"role": "assistant", ...}]``."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        message = value[0]
        if message.get("role") == "assistant" and isinstance(message.get("content"), str):
            return message["content"]
    return None


class ListDataset(torch.utils.data.Dataset):
    """Map-style dataset over samples read from JSON / JSONL."""

    def __init__(self, samples: Sequence[Sample], process: SampleProcessor) -> None:
        self.samples = list(samples)
        self.process = process

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any] | Skipped:
        return self.process(self.samples[index])


class ShardDataset(torch.utils.data.IterableDataset):
    """Iterable dataset over webdataset shards (split across processes and workers by webdataset)."""

    def __init__(self, make_iter: Callable[[], Iterator[Sample]], process: SampleProcessor) -> None:
        self.make_iter = make_iter
        self.process = process

    def __iter__(self) -> Iterator[dict[str, Any] | Skipped]:
        for sample in self.make_iter():
            yield self.process(sample)


class Collator:
    """Pads a list of processed samples into a batch and counts the skipped ones.

    Args:
        pad_id: the tokenizer's pad id.
        processors: per modality, the media processor whose ``collate`` stacks that modality's inputs.
        padding_side: "right" for training, "left" for generation prompts.
    """

    def __init__(self, pad_id: int, processors: Mapping[str, MediaProcessor], padding_side: str = "right") -> None:
        self.pad_id = pad_id
        self.processors = dict(processors)
        self.padding_side = padding_side

    def __call__(self, items: Sequence[dict[str, Any] | Skipped]) -> dict[str, Any]:
        good = [x for x in items if not isinstance(x, Skipped)]
        skipped = [x for x in items if isinstance(x, Skipped)]
        batch: dict[str, Any] = {
            "num_samples": len(items),
            "skipped": [f"{s.where}: {s.reason}" for s in skipped],
            "ids": [x["id"] for x in good],
        }
        # a pair gives two rows per sample (chosen, rejected), which share the sample's media
        encoded: list[Encoded] = [
            e for x in good for e in (x["encoded"] if isinstance(x["encoded"], list) else [x["encoded"]])
        ]
        width = max((len(e.input_ids) for e in encoded), default=0)
        input_ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(encoded), width), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            n = len(e.input_ids)
            cols = slice(width - n, width) if self.padding_side == "left" else slice(0, n)
            input_ids[row, cols] = torch.tensor(e.input_ids)
            labels[row, cols] = torch.tensor(e.labels)
            attention_mask[row, cols] = 1
        media: dict[str, torch.Tensor] = {}
        for modality, processor in self.processors.items():
            tensors = [t for x in good for t in x["media"].get(modality, [])]
            if tensors:
                media[modality] = processor.collate(tensors)
        batch.update(input_ids=input_ids, attention_mask=attention_mask, labels=labels, media=media)
        if good and "reference" in good[0]:
            batch["references"] = [x["reference"] for x in good]
            batch["tasks"] = [x["task"] for x in good]
        if good and "fields" in good[0]:
            batch["fields"] = [x["fields"] for x in good]
        batch["rows_per_sample"] = len(encoded) // len(good) if good else 1
        return batch
