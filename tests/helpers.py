"""Small helpers shared by test modules."""

from __future__ import annotations

from mmpost.data.loader import make_pipeline


def make_batch(model, samples, mode: str = "train"):
    """A collated batch of ``samples`` for ``model`` through the real data pipeline (no DataLoader)."""
    process, collate = make_pipeline(model, max_length=512, mode=mode)
    return collate([process(s) for s in samples])
