"""The one in-memory shape of a training sample, whatever file format it came from.

Readers (``sources.py``) turn LLaVA JSON, ``messages`` JSON/JSONL and webdataset shards into
``Sample``; the dataset (``dataset.py``) decodes its media and tokenizes its messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmpost.interfaces import PLACEHOLDERS

__all__ = ["PLACEHOLDERS", "DataError", "Sample"]


class DataError(ValueError):
    """A sample or data file that cannot be used; the message names the file and the sample."""


@dataclass
class Sample:
    """One conversation with its media.

    Attributes:
        id: the sample's id in its source (LLaVA ``id``, a JSON line number, a shard key).
        messages: ``[{"role": "user" | "assistant" | "system", "content": str}, ...]``; media appear
            in ``content`` as placeholders (``<image>``), one per medium.
        media: ``{"image": [ref, ...]}`` in placeholder order; a ref is a file path or the raw bytes.
        meta: anything else the source carried (``task``, ``answer``, ...), kept for evaluation.
        source: the file the sample came from, for messages.
    """

    id: str
    messages: list[dict[str, str]]
    media: dict[str, list[Path | bytes]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def where(self) -> str:
        return f"sample {self.id!r} of {self.source}" if self.source else f"sample {self.id!r}"

    def check_placeholders(self) -> None:
        """Raises DataError when a modality's placeholder count differs from its number of media."""
        text = "".join(m["content"] for m in self.messages)
        for modality, token in PLACEHOLDERS.items():
            n_refs = len(self.media.get(modality, []))
            n_tokens = text.count(token)
            if n_refs != n_tokens:
                raise DataError(
                    f"{self.where()}: {n_tokens} {token} placeholder(s) in its text but {n_refs} {modality}(s); "
                    f"put exactly one {token} where each {modality} belongs"
                )
