"""Small helpers shared by test modules."""

from __future__ import annotations

from mmpost.data.chat import ChatEncoder
from mmpost.data.dataset import Collator, SampleProcessor


def make_batch(model, samples, mode: str = "train"):
    """A collated batch of ``samples`` for ``model`` through the real data pipeline (no DataLoader)."""
    processors = {m: e.preprocessor() for m, e in model.encoders.items()}
    chat = ChatEncoder(model.tokenizer, model.placeholder_ids, max_length=512)
    process = SampleProcessor(chat, processors, model.media_tokens, mode=mode)
    side = "right" if mode == "train" else "left"
    return Collator(model.tokenizer.pad_token_id, processors, side)([process(s) for s in samples])
