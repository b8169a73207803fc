"""Reloading an export and comparing it with the source model on a few probe prompts, with a probe image and
a probe audio clip for a model that reads them."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch
from PIL import Image, ImageDraw

from mmpost.data.batches import PromptBatch
from mmpost.data.media import decode_audio
from mmpost.data.pipeline import PromptPipeline
from mmpost.data.sample import PLACEHOLDERS, Sample
from mmpost.families.base import ExportError, Family
from mmpost.interfaces import Audio
from mmpost.model.lmm import LMM

PROBE_PROMPTS = ("What is in the image?", "What colour is the shape?", "How many shapes are there?", "Describe it.")
PROBE_NEW_TOKENS = 8
_PROBE_COLOURS = ((220, 0, 0), (0, 170, 0), (0, 0, 230), (250, 210, 0))
PROBE_RATE = 16_000


def probe_image(index: int, size: int = 64) -> Image.Image:
    """A small deterministic picture: ``index + 1`` (up to 3) filled boxes or discs of one colour on grey. Any
    picture serves a comparison of two implementations; these are cheap and the same everywhere."""
    image = Image.new("RGB", (size, size), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    colour = _PROBE_COLOURS[index % len(_PROBE_COLOURS)]
    cell = size // 3
    for k in range(index % 3 + 1):
        box = (k * cell + 2, k * cell + 2, (k + 1) * cell - 3, (k + 1) * cell - 3)
        (draw.ellipse if index % 2 else draw.rectangle)(box, fill=colour)
    return image


def probe_audio(index: int) -> bytes:
    """A small deterministic clip as WAV bytes (float samples, so decoding gives them back exactly): ``index % 3
    + 1`` beeps of one pitch, 0.25 s each with 0.25 s of quiet between, 16 kHz. Like the probe pictures, any clip
    serves a comparison of two implementations."""
    step = PROBE_RATE // 4
    t = np.arange(step) / PROBE_RATE
    tone = 0.4 * np.sin(2 * np.pi * 220.0 * (index % 4 + 1) * t) * np.hanning(step)
    quiet = np.zeros(step)
    waveform = np.concatenate([quiet] + [np.concatenate([tone, quiet]) for _ in range(index % 3 + 1)])
    wav = io.BytesIO()
    soundfile.write(wav, waveform.astype(np.float32), PROBE_RATE, format="WAV", subtype="FLOAT")
    return wav.getvalue()


@dataclass
class Probe:
    """One prompt (with a probe image and a probe clip when the model reads them) as mmpost's pipeline batches it.

    Attributes:
        audio: the clip as mmpost decodes it (what a family's processor is given too); None for a model
            without audio.
    """

    prompt: str
    image: Any
    batch: PromptBatch
    audio: Audio | None = None

    def args(self) -> tuple:
        return self.batch.input_ids, self.batch.attention_mask, self.batch.media


def probes(model: LMM, count: int = len(PROBE_PROMPTS), image_size: int = 64) -> list[Probe]:
    pipeline = PromptPipeline.for_model(model, max_length=1 << 30)
    out = []
    for i in range(count):
        image = probe_image(i, image_size)
        png = io.BytesIO()
        image.save(png, format="PNG")
        media: dict[str, list[bytes]] = {}
        if "image" in model.modalities:
            media["image"] = [png.getvalue()]
        if "audio" in model.modalities:
            media["audio"] = [probe_audio(i)]
        prompt = PROBE_PROMPTS[i % len(PROBE_PROMPTS)]
        prefix = "".join(PLACEHOLDERS[m] + "\n" for m in media)
        sample = Sample(id=f"probe-{i}", messages=[{"role": "user", "content": prefix + prompt}], media=media)
        audio = decode_audio(media["audio"][0]) if "audio" in media else None
        out.append(Probe(prompt, image, pipeline.collate([pipeline.process(sample)]), audio))
    return out


@torch.no_grad()
def outputs(model: LMM, probe_list: list[Probe]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``model``'s logits ``[1, T, V]`` and greedy tokens on each probe."""
    return [(model(*p.args()).dense(), model.generate(*p.args(), PROBE_NEW_TOKENS)) for p in probe_list]


def answers_text(model: LMM, expected: list) -> list[str]:
    """The greedy answers of ``outputs`` as text, up to the end of sequence, special tokens and surrounding
    whitespace dropped."""
    tokenizer, texts = model.tokenizer, []
    for _, tokens in expected:
        ids = tokens[0].tolist()
        if tokenizer.eos_token_id in ids:
            ids = ids[: ids.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return texts


def agreement(expected: list, got: list) -> tuple[dict[str, Any], int]:
    """Max |logit difference| over the probes, and how many probes give the same greedy tokens."""
    diff = max(float((e[0] - g[0]).abs().max()) for e, g in zip(expected, got, strict=True))
    same = sum(torch.equal(e[1], g[1]) for e, g in zip(expected, got, strict=True))
    return {"max_abs_logit_diff": diff, "greedy_agreement": f"{same}/{len(expected)}"}, same


def tolerance(logits: torch.Tensor) -> float:
    return 1e-3 * max(1.0, float(logits.abs().max()))


def verdict(expected: list, got: list, who: str) -> dict[str, Any]:
    """The agreement figures; raises ExportError when the export does not reproduce the source."""
    figures, same = agreement(expected, got)
    if figures["max_abs_logit_diff"] > tolerance(expected[0][0]):
        raise ExportError(f"{who} differs from the source: max |logit difference| {figures['max_abs_logit_diff']:.3g}")
    if same != len(expected):
        raise ExportError(f"{who} generates other greedy tokens than the source on {len(expected) - same} probe(s)")
    return figures


def check_mmpost_export(model: LMM, out: Path, probe_list: list[Probe], expected: list) -> dict[str, Any]:
    """Reloads ``out`` with mmpost and compares logits and greedy tokens with ``model``'s ``expected``."""
    from mmpost.model.build import load_lmm

    reloaded = load_lmm(out).eval()
    if (model.quantization is None) != (reloaded.quantization is None):
        raise ExportError("the reloaded export lost or gained the quantization of the source")
    return verdict(expected, outputs(reloaded, probe_list), "the reloaded export")


@torch.no_grad()
def check_hf_export(model: LMM, family: Family, out: Path, probe_list: list[Probe], expected: list) -> dict[str, Any]:
    """Loads ``out`` with transformers' Auto classes and compares with ``model`` on the probes.

    Checks that the exported processor gives the same token ids and media tensors as mmpost's own
    pipeline, that logits agree, and that greedy generation gives the same tokens.
    """
    import transformers
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(out)
    hf = getattr(transformers, family.auto_class).from_pretrained(out, dtype=torch.float32).eval()
    got, media_diff = [], 0.0
    for probe in probe_list:
        inputs = family.processor_inputs(processor, model, probe)
        if not torch.equal(inputs["input_ids"], probe.batch.input_ids):
            raise ExportError(
                f"the exported processor tokenizes the probe differently ({inputs['input_ids'].shape[1]} tokens vs "
                f"mmpost's {probe.batch.input_ids.shape[1]})"
            )
        if probe.batch.media:
            media_diff = max(media_diff, family.media_difference(inputs, probe))
        if media_diff > 1e-5:
            raise ExportError(f"the exported processor's media differ from mmpost's preprocessing by {media_diff:.3g}")
        tokens = hf.generate(**inputs, max_new_tokens=PROBE_NEW_TOKENS, do_sample=False)
        got.append((hf(**inputs).logits, tokens[:, inputs["input_ids"].shape[1] :]))
    return {**verdict(expected, got, "transformers' reload of the export"), "media_diff": media_diff}
