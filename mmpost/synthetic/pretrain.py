"""Pretraining a tiny encoder of any family on synthetic media, standing in for its real pretraining.

Real LMMs start from pretrained towers (CLIP, Whisper, wav2vec2). A random tiny tower learns the
synthetic attributes only slowly through an LLM, so the demo and ``tools/connector_table.py`` first
fit linear heads for each attribute on the encoder's mean feature over freshly drawn media (their
own random stream, never the data set's files), training the encoder with them. This goes through
the encoder's own preprocessing and forward, so it works for every registered family.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from mmpost.interfaces import Audio, Encoder

# draw(rng) -> (raw medium as the encoder's processor takes it, {attribute: class index})
Draw = Callable[[random.Random], tuple[Any, dict[str, int]]]


def draw_shapes(image_size: int = 64) -> tuple[Draw, dict[str, int]]:
    """A drawer of synthetic shape images and its attributes' class counts (colour, shape, count)."""
    from mmpost.synthetic.scenes import COLOURS, SHAPES, draw_scene

    colours, shapes = sorted(COLOURS), sorted(SHAPES)

    def draw(rng: random.Random) -> tuple[Any, dict[str, int]]:
        scene, image = draw_scene(rng, image_size)
        labels = {"colour": colours.index(scene.colour), "shape": shapes.index(scene.shape), "count": scene.count - 1}
        return image, labels

    return draw, {"colour": len(colours), "shape": len(shapes), "count": 3}


def draw_beeps() -> tuple[Draw, dict[str, int]]:
    """A drawer of synthetic tone clips and its attributes' class counts (pitch, length, beeps)."""
    from mmpost.synthetic.audio import LENGTHS, PITCHES, SAMPLE_RATE, draw_tones

    pitches, lengths = list(PITCHES), list(LENGTHS)

    def draw(rng: random.Random) -> tuple[Any, dict[str, int]]:
        tones, wave = draw_tones(rng)
        labels = {"pitch": pitches.index(tones.pitch), "length": lengths.index(tones.length), "beeps": tones.beeps - 1}
        return Audio(torch.from_numpy(wave), SAMPLE_RATE), labels

    return draw, {"pitch": len(pitches), "length": len(lengths), "beeps": 3}


def pretrain_encoder(
    encoder: Encoder,
    draw: Draw,
    classes: dict[str, int],
    steps: int = 600,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Trains ``encoder`` in place with linear heads on its mean features; returns the heads' accuracy
    over the last 10 batches, per attribute. The encoder is left in eval mode, without the heads."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rng = random.Random(f"pretrain/{seed}")
    processor = encoder.preprocessor()
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(encoder.output_dim, n) for k, n in classes.items()})
    optimizer = torch.optim.AdamW([*encoder.parameters(), *heads.parameters()], lr=lr)
    hits: dict[str, list[float]] = {k: [] for k in classes}
    encoder.train()
    for step in tqdm(range(steps), desc=f"pretrain {type(encoder).__name__}", leave=False, disable=not progress):
        raws, labels = zip(*(draw(rng) for _ in range(batch_size)), strict=True)
        out = encoder(processor.collate([processor(raw) for raw in raws]))
        weights = torch.ones(out.features.shape[:2]) if out.mask is None else out.mask.float()
        pooled = (out.features * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True)  # [B, D]
        loss = torch.zeros(())
        for key, head in heads.items():
            target = torch.tensor([label[key] for label in labels])
            logits = head(pooled)
            loss = loss + F.cross_entropy(logits, target)
            if step >= steps - 10:
                hits[key].append(float((logits.argmax(-1) == target).float().mean()))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    encoder.eval()
    return {k: sum(v) / max(len(v), 1) for k, v in hits.items()}
