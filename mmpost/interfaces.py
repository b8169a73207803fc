"""The contracts between the LMM and its swappable parts.

This module is a leaf: ``encoders/`` and ``connectors/`` import it (and ``mmpost.registry``) and
nothing else of mmpost, and it imports nothing of theirs. The LMM reaches concrete parts only
through the registries in ``encoders`` and ``connectors``.

An encoder turns one raw medium into model input in a data worker (``preprocessor()``) and a batch
of inputs into a feature sequence (``forward``). A token connector maps those features to ``M``
LLM-width vectors that replace the ``M`` placeholder tokens of that medium in the text.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

# The placeholder token of each modality in message text: one per medium, expanded by the data
# pipeline to the connector's token count and replaced by media tokens in the LMM.
PLACEHOLDERS: dict[str, str] = {"image": "<image>"}


@dataclass
class EncoderOutput:
    """What an encoder returns for a batch of media.

    Attributes:
        features: ``[B, N, D]`` feature sequence, ``D == encoder.output_dim``.
        mask: ``[B, N]`` bool, True where a feature is real (variable-length media); None when all are.
    """

    features: torch.Tensor
    mask: torch.Tensor | None = None


class MediaProcessor:
    """Turns one raw medium into an encoder input; runs in DataLoader workers, so keep it light.

    Subclasses implement ``__call__``; ``collate`` stacks a list of processed items into the batch
    tensor the encoder's ``forward`` takes (override it for variable-length media).
    """

    def __call__(self, raw: Any) -> torch.Tensor:
        raise NotImplementedError

    def collate(self, items: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(items))


class Encoder(nn.Module, ABC):
    """A backbone that turns media into features, with its own preprocessing.

    Attributes:
        modality: the medium it reads ("image", "audio").
        output_dim: feature width ``D``.
    """

    modality: ClassVar[str] = "image"
    output_dim: int

    @abstractmethod
    def preprocessor(self) -> MediaProcessor:
        """A picklable, deterministic callable from a raw medium (PIL image, ...) to an input tensor."""

    def preprocess(self, raw: Any) -> torch.Tensor:
        return self.preprocessor()(raw)

    @abstractmethod
    def forward(self, inputs: torch.Tensor) -> EncoderOutput:
        """Encodes a batch of preprocessed inputs into ``[B, N, D]`` features."""

    @abstractmethod
    def num_tokens(self, input_shape: Sequence[int]) -> int:
        """Number of feature tokens ``N`` for one preprocessed input of ``input_shape`` (no batch dim)."""

    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """Constructor kwargs that rebuild this architecture with no file access and no pretrained weights.

        The LMM saves the spec in its JSON config and the weights in safetensors, so a saved model
        loads on a machine that has neither the original checkpoint path nor network access.
        """

    def block_classes(self) -> tuple[type[nn.Module], ...]:
        """Repeated block classes, for FSDP wrapping and activation checkpointing."""
        return ()


class Connector(nn.Module, ABC):
    """Maps encoder features to what the LLM consumes.

    A connector is created without dimensions (``mmpost.connector("mlp", depth=2)``) and gets them
    when the LMM attaches it, through ``build(in_dim, out_dim)``.

    Attributes:
        kind: "token" (features become ``M`` tokens spliced into the text) or "fusion".
    """

    kind: ClassVar[str] = "token"

    def __init__(self) -> None:
        super().__init__()
        self.in_dim: int | None = None
        self.out_dim: int | None = None

    def build(self, in_dim: int, out_dim: int) -> None:
        """Creates the layers for encoder width ``in_dim`` and LLM width ``out_dim``.

        Raises:
            ValueError: if the connector's fixed dimensions do not fit; the message names both.
        """
        self.in_dim, self.out_dim = in_dim, out_dim
        self._build(in_dim, out_dim)

    @property
    def is_built(self) -> bool:
        return self.in_dim is not None

    @abstractmethod
    def _build(self, in_dim: int, out_dim: int) -> None: ...

    @abstractmethod
    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, N, in_dim]`` features (and ``[B, N]`` mask) to ``[B, M, out_dim]`` LLM inputs."""

    @abstractmethod
    def num_tokens(self, num_features: int) -> int:
        """``M`` for ``N = num_features`` input features: how many placeholders a medium expands to."""

    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """Constructor kwargs (dimensions excluded: they come from ``build``)."""
