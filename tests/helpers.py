"""Small helpers shared by test modules."""

from __future__ import annotations

import torch

from mmpost.data.loader import make_pipeline


def make_batch(model, samples, mode: str = "train"):
    """A collated batch of ``samples`` for ``model`` through the real data pipeline (no DataLoader)."""
    process, collate = make_pipeline(model, max_length=512, mode=mode)
    return collate([process(s) for s in samples])


def greedy_without_cache(model, batch, steps: int) -> torch.Tensor:
    """Greedy decoding by a full forward over the growing sequence at every step (no KV cache); media
    placeholders are never generated, as in ``LMM.generate``."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    new = []
    for _ in range(steps):
        logits = model(ids, mask, batch["media"])[:, -1]
        logits[:, list(model.placeholder_ids.values())] = float("-inf")
        token = logits.argmax(-1, keepdim=True)
        new.append(token)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return torch.cat(new, 1)
