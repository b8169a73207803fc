"""Projection connectors (LLaVA): each feature becomes one LLM token through a linear map or an MLP.

``mlp`` with ``depth=2`` is LLaVA-1.5's ``mlp2x_gelu`` projector: Linear(D_enc, D_llm), GELU,
Linear(D_llm, D_llm). ``linear`` is LLaVA-1's projector.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmpost.interfaces import Connector


class MLPConnector(Connector):
    """``depth`` linear layers with GELU between them; the first maps D_enc to D_llm.

    Args:
        depth: number of linear layers (1 is a plain linear projection; 2 is LLaVA-1.5's projector).
        bias: whether the linear layers have biases.
    """

    def __init__(self, depth: int = 2, bias: bool = True) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"mlp connector: depth must be >= 1, got {depth}")
        self.depth = depth
        self.bias = bias
        self.layers = nn.Sequential()

    def _build(self, in_dim: int, out_dim: int) -> None:
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim, bias=self.bias)]
        for _ in range(self.depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim, bias=self.bias)]
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.layers(features)  # [B, N, D_llm]

    def num_tokens(self, num_features: int) -> int:
        return num_features

    def token_mask(self, feature_mask: torch.Tensor | None) -> torch.Tensor | None:
        return feature_mask  # one token per feature: padded audio frames give padded tokens

    def spec(self) -> dict[str, Any]:
        return {"depth": self.depth, "bias": self.bias}


class LinearConnector(MLPConnector):
    """One linear map from D_enc to D_llm per feature (LLaVA-1).

    Args:
        bias: whether the linear layer has a bias.
    """

    def __init__(self, bias: bool = True) -> None:
        super().__init__(depth=1, bias=bias)

    def spec(self) -> dict[str, Any]:
        return {"bias": self.bias}
