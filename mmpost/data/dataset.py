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

import soundfile
import torch
from PIL import Image

from mmpost.data.chat import ChatEncoder, Encoded, Skipped
from mmpost.data.sample import Sample
from mmpost.interfaces import Audio, MediaProcessor

TokenCounter = Callable[[str, tuple[int, ...]], int]


def decode_image(ref: Path | bytes) -> Image.Image:
    """Opens an image file or bytes fully (PIL is lazy; decoding errors must surface here)."""
    with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as img:
        img.load()
        return img.convert("RGB")


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
            as the reference answer) or "prompt" (the whole conversation as a prompt).
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
        encoded = self.chat.encode(sample, counts) if self.mode == "train" else self.chat.encode_prompt(sample, counts)
        if isinstance(encoded, Skipped):
            return encoded
        out: dict[str, Any] = {"id": sample.id, "encoded": encoded, "media": media}
        if self.mode == "generate":
            out["reference"] = sample.messages[-1]["content"]
            out["task"] = str(sample.meta.get("task", ""))
        return out


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
        encoded: list[Encoded] = [x["encoded"] for x in good]
        width = max((len(e.input_ids) for e in encoded), default=0)
        input_ids = torch.full((len(good), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(good), width), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(good), width), dtype=torch.long)
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
        return batch
