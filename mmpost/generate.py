"""Answering a prompt about media with a saved model (``mmpost generate``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from mmpost.data.chat import Skipped
from mmpost.data.pipeline import PromptPipeline
from mmpost.data.sample import PLACEHOLDERS, Sample
from mmpost.families import open_model
from mmpost.model.lmm import LMM


def answer(
    model: LMM | str | Path,
    prompt: str,
    images: Sequence[str | Path] = (),
    max_new_tokens: int = 64,
    audios: Sequence[str | Path] = (),
    **generate_kwargs,
) -> str:
    """Greedy (by default) answer of ``model`` to one user turn with ``images`` and ``audios``.

    The prompt gets one ``<image>`` per image (and ``<audio>`` per clip) in front of it unless it
    already places them.

    Raises:
        FileNotFoundError: for a missing model directory or image.
        ValueError: when the prompt's placeholders do not match the images, or an image cannot be read.
    """
    if not isinstance(model, LMM):
        model = open_model(model)
    given = {"image": [Path(p) for p in images], "audio": [Path(p) for p in audios]}
    for modality, files in given.items():
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"--{modality} {file}: no such file")
        token = PLACEHOLDERS[modality]
        if files and token not in prompt:
            prompt = token * len(files) + "\n" + prompt
    sample = Sample(
        id="prompt",
        messages=[{"role": "user", "content": prompt}],
        media={modality: files for modality, files in given.items() if files},
        source="the command line",
    )
    sample.check_placeholders()
    pipeline = PromptPipeline.for_model(model, max_length=1 << 30)
    item = pipeline.process(sample)
    if isinstance(item, Skipped):
        raise ValueError(f"{item.where}: {item.reason}")
    batch = pipeline.collate([item]).to(next(model.parameters()).device)
    model.eval()
    with torch.no_grad():
        new = model.generate(
            batch.input_ids,
            batch.attention_mask,
            batch.media,
            max_new_tokens=max_new_tokens,
            **generate_kwargs,
        )
    return model.tokenizer.decode(new[0], skip_special_tokens=True).strip()
