"""Qwen2-VL's patch merger: each ``merge x merge`` unit of neighbouring patches becomes one LLM token.

The module is transformers' own (``PatchMerger`` of Qwen2-VL: LayerNorm; ``Qwen2_5_VLPatchMerger``: RMSNorm;
both then Linear(unit * D, unit * D), GELU, Linear(unit * D, D_llm)), so a checkpoint's merger weights load
under their own names and compute what the released model computes. It reads features whose consecutive
``unit = merge**2`` rows are one unit (the ``qwen2_vl`` encoder's order).
"""

from __future__ import annotations

from typing import Any

import torch

from mmpost.interfaces import Connector

_MERGERS = {
    "layer": "transformers.models.qwen2_vl.modeling_qwen2_vl:PatchMerger",
    "rms": "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLPatchMerger",
}


class PatchMergerConnector(Connector):
    """Groups ``merge_size**2`` patch features into one token through a normalised 2-layer MLP.

    Args:
        merge_size: patches per side of a unit (Qwen2-VL: 2, so 4 patches per token).
        norm: "layer" (Qwen2-VL) or "rms" (Qwen2.5-VL).

    Raises:
        ValueError: on an unknown ``norm`` or a ``merge_size`` below 1.
    """

    def __init__(self, merge_size: int = 2, norm: str = "layer") -> None:
        super().__init__()
        if norm not in _MERGERS:
            raise ValueError(f"patch_merger: norm {norm!r}; use one of {', '.join(_MERGERS)}")
        if merge_size < 1:
            raise ValueError(f"patch_merger: merge_size must be >= 1, got {merge_size}")
        self.merge_size = merge_size
        self.norm = norm
        self.unit = merge_size**2

    def _build(self, in_dim: int, out_dim: int) -> None:
        import importlib

        module, _, name = _MERGERS[self.norm].partition(":")
        merger_cls = getattr(importlib.import_module(module), name)
        self.merger = merger_cls(dim=out_dim, context_dim=in_dim, spatial_merge_size=self.merge_size)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, _ = features.shape
        if length % self.unit:
            raise ValueError(f"patch_merger: {length} features per medium is not a whole number of {self.unit}-units")
        return self.merger(features.reshape(-1, self.in_dim)).reshape(batch, length // self.unit, -1)

    def num_tokens(self, num_features: int) -> int:
        return num_features // self.unit

    def token_mask(self, feature_mask: torch.Tensor | None) -> torch.Tensor | None:
        return None if feature_mask is None else feature_mask[:, :: self.unit]

    def spec(self) -> dict[str, Any]:
        return {"merge_size": self.merge_size, "norm": self.norm}
