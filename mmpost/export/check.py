"""Reloading an export and comparing it with the source model on a probe image and prompt."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import torch

from mmpost.data.loader import make_pipeline
from mmpost.data.sample import PLACEHOLDERS, Sample
from mmpost.data.synth import draw_scene
from mmpost.export.hf_llava import ExportError
from mmpost.model.lmm import LMM

PROBE_PROMPT = "What is in the image?"
PROBE_NEW_TOKENS = 8


def probe_batch(model: LMM, image_size: int = 64) -> tuple[dict[str, Any], Any]:
    """A one-sample prompt batch (a synthetic image when the model reads images) and the image."""
    _, image = draw_scene(random.Random(0), image_size)
    png = io.BytesIO()
    image.save(png, format="PNG")
    reads_images = "image" in model.modalities
    prefix = PLACEHOLDERS["image"] + "\n" if reads_images else ""
    sample = Sample(
        id="probe",
        messages=[{"role": "user", "content": prefix + PROBE_PROMPT}],
        media={"image": [png.getvalue()]} if reads_images else {},
    )
    process, collate = make_pipeline(model, max_length=1 << 30, mode="prompt")
    return collate([process(sample)]), image


def tolerance(logits: torch.Tensor) -> float:
    return 1e-3 * max(1.0, float(logits.abs().max()))


def check_mmpost_export(model: LMM, out: Path) -> dict[str, Any]:
    """Reloads ``out`` with mmpost and compares logits and greedy tokens with ``model``."""
    from mmpost.model.io import load_lmm

    batch, _ = probe_batch(model)
    args = (batch["input_ids"], batch["attention_mask"], batch["media"])
    reloaded = load_lmm(out).eval()
    expected, got = model(*args), reloaded(*args)
    diff = float((expected - got).abs().max())
    if diff > tolerance(expected):
        raise ExportError(f"reloaded export differs from the source: max |logit difference| {diff:.3g}")
    same = torch.equal(model.generate(*args, PROBE_NEW_TOKENS), reloaded.generate(*args, PROBE_NEW_TOKENS))
    if not same:
        raise ExportError("reloaded export generates other greedy tokens than the source")
    return {"max_abs_logit_diff": diff, "same_greedy_tokens": same}


def check_hf_export(model: LMM, out: Path) -> dict[str, Any]:
    """Loads ``out`` with transformers' Auto classes and compares with ``model`` on the probe.

    Checks that the exported processor gives the same token ids and pixel values as mmpost's own
    pipeline, that logits agree, and that greedy generation gives the same tokens.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    batch, image = probe_batch(model)
    processor = AutoProcessor.from_pretrained(out)
    hf = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    text = model.tokenizer.apply_chat_template(
        [{"role": "user", "content": PLACEHOLDERS["image"] + "\n" + PROBE_PROMPT}],
        tokenize=False,
        add_generation_prompt=True,
    )
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    if not torch.equal(inputs["input_ids"], batch["input_ids"]):
        raise ExportError(
            f"the exported processor tokenizes the probe differently ({inputs['input_ids'].shape[1]} tokens vs "
            f"mmpost's {batch['input_ids'].shape[1]})"
        )
    pixel_diff = float((inputs["pixel_values"] - batch["media"]["image"]).abs().max())
    if pixel_diff > 1e-5:
        raise ExportError(f"the exported image processor differs from mmpost's preprocessing by {pixel_diff:.3g}")
    expected = model(batch["input_ids"], batch["attention_mask"], batch["media"])
    got = hf(**inputs).logits
    diff = float((expected - got).abs().max())
    if diff > tolerance(expected):
        raise ExportError(f"transformers' logits differ from mmpost's by up to {diff:.3g}")
    ours = model.generate(batch["input_ids"], batch["attention_mask"], batch["media"], PROBE_NEW_TOKENS)
    theirs = hf.generate(**inputs, max_new_tokens=PROBE_NEW_TOKENS, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    if not torch.equal(ours, theirs):
        raise ExportError(f"transformers generates {theirs.tolist()} where mmpost generates {ours.tolist()}")
    return {"max_abs_logit_diff": diff, "pixel_diff": pixel_diff, "same_greedy_tokens": True}
