"""The contracts between the LMM and its swappable parts.

This module is a leaf: ``encoders/`` and ``connectors/`` import it (and ``mmpost.registry``) and
nothing else of mmpost, and it imports nothing of theirs. The LMM reaches concrete parts only
through the registries in ``encoders`` and ``connectors``.

An encoder turns one raw medium into model input in a data worker (``preprocessor()``) and a batch
of inputs into a feature sequence (``forward``). A token connector maps those features to ``M``
LLM-width vectors that replace the ``M`` placeholder tokens of that medium in the text. A fusion
connector instead keeps one marker token per medium in the text and adds gated cross-attention
blocks that run before some of the LLM's decoder layers.
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
PLACEHOLDERS: dict[str, str] = {"image": "<image>", "audio": "<audio>"}


@dataclass(frozen=True)
class MediaText:
    """How one medium is written in a model's own text.

    Data always marks a medium with its placeholder (``<image>``). A model may write it otherwise: Qwen2-VL as
    ``<|vision_start|><|image_pad|><|vision_end|>``, BLIP-2 as query tokens. ``text`` replaces the placeholder
    before the chat template renders; ``token`` (a single token, inside ``text``) is repeated to the connector's
    token count and replaced by the media tokens.
    """

    text: str
    token: str


def default_media_text(modalities) -> dict[str, MediaText]:
    """Each modality written as its placeholder itself (``<image>``)."""
    return {m: MediaText(PLACEHOLDERS[m], PLACEHOLDERS[m]) for m in modalities}


# The label of a position that no loss reads (prompt, media and padding tokens), as transformers and PyTorch's
# cross-entropy take it.
IGNORE = -100

# What a processor's ``collate`` returns and an encoder's ``forward`` takes: a stacked tensor, or for
# variable-length media a dict of tensors (e.g. padded values and lengths).
MediaBatch = torch.Tensor | dict[str, torch.Tensor]


def media_count(inputs: MediaBatch) -> int:
    """Number of media in a collated batch."""
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    return next(iter(inputs.values())).shape[0]


# The keys of a collated batch of cached features (``data.cache_features``), which stands for an encoder's output
CACHED = "cached_features"
CACHED_MASK = "cached_mask"


@dataclass
class Audio:
    """A decoded audio clip, the raw input of audio processors.

    Attributes:
        waveform: ``[samples]`` mono float32 in [-1, 1].
        rate: samples per second.
    """

    waveform: torch.Tensor
    rate: int


@dataclass
class EncoderOutput:
    """What an encoder returns for a batch of media.

    Attributes:
        features: ``[B, N, D]`` feature sequence, ``D == encoder.output_dim``.
        mask: ``[B, N]`` bool, True where a feature is real (variable-length media); None when all are.
        context: inputs a connector reads beside the features, one row per medium, passed through from the
            collated batch (InstructBLIP's instruction tokens for its Q-Former); None for most encoders.
    """

    features: torch.Tensor
    mask: torch.Tensor | None = None
    context: dict[str, torch.Tensor] | None = None


class MediaProcessor:
    """Turns one raw medium into an encoder input; runs in DataLoader workers, so keep it light.

    Subclasses implement ``__call__``; ``collate`` stacks a list of processed items into the batch
    the encoder's ``forward`` takes (override it for variable-length media). The shape of one
    processed item must tell the encoder's ``num_tokens`` how many features it gives.

    A processor with ``reads_text = True`` is called ``processor(raw, text)``, ``text`` being the text of the
    message that holds the medium (its placeholders removed, as a typed chat template writes it).
    """

    reads_text: ClassVar[bool] = False

    def __call__(self, raw: Any) -> torch.Tensor:
        raise NotImplementedError

    def collate(self, items: Sequence[torch.Tensor]) -> MediaBatch:
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
        """A picklable, deterministic callable from a raw medium (PIL image, ``Audio``) to an input tensor."""

    def preprocess(self, raw: Any) -> torch.Tensor:
        return self.preprocessor()(raw)

    @abstractmethod
    def forward(self, inputs: MediaBatch) -> EncoderOutput:
        """Encodes a collated batch of preprocessed inputs into ``[B, N, D]`` features (and a mask)."""

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

    def connect(self, out: EncoderOutput) -> torch.Tensor:
        """The LLM inputs of an encoder output; connectors that read ``out.context`` override this."""
        return self(out.features, out.mask)

    def token_mask(self, feature_mask: torch.Tensor | None) -> torch.Tensor | None:
        """``[B, M]`` True where an output token is real, for the feature mask ``[B, N]``.

        None when every medium gives exactly ``num_tokens`` tokens (fixed-count connectors); a
        per-feature connector returns the feature mask, so padded audio frames are dropped.
        """
        return None

    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """Constructor kwargs (dimensions excluded: they come from ``build``)."""


class FusionConnector(Connector):
    """Feeds media to the LLM through gated cross-attention blocks run before some decoder layers.

    The text keeps one marker token per medium (``num_tokens`` is 1). The LMM calls ``media`` once per
    forward, then, before each decoder layer in ``layer_indices``, that layer's ``block`` with the
    hidden states, the media of each sample and which media each text position may attend to.
    """

    kind: ClassVar[str] = "fusion"

    def build(self, in_dim: int, out_dim: int, num_layers: int | None = None) -> None:
        """Creates the media path for encoder width ``in_dim`` and the blocks for an LLM of width
        ``out_dim`` with ``num_layers`` decoder layers."""
        if num_layers is None:
            raise ValueError(f"{type(self).__name__} needs the LLM's number of decoder layers to build")
        self.in_dim, self.out_dim, self.num_layers = in_dim, out_dim, num_layers
        self._build(in_dim, out_dim)

    @abstractmethod
    def media(self, features: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[K, N, in_dim]`` features to the ``[K, S, D_m]`` vectors blocks attend to, with a ``[K, S]`` mask."""

    @abstractmethod
    def layer_indices(self) -> list[int]:
        """Decoder layers (0-based) that get a cross-attention block before them."""

    @abstractmethod
    def block(self, layer_index: int) -> nn.Module:
        """The block before ``layer_index``: ``block(hidden [B, T, D], media [B, S, D_m], allowed [B, T, S])``
        returns the new hidden states; ``allowed`` is False where a position may not see a media vector."""

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.media(features, mask)[0]

    def num_tokens(self, num_features: int) -> int:
        return 1


def cached_output(inputs: MediaBatch) -> EncoderOutput | None:
    """The encoder output a batch of cached media stands for (``mmpost.data.feature_cache``), or None for a batch
    of encoder inputs."""
    if not (isinstance(inputs, dict) and CACHED in inputs):
        return None
    mask = inputs[CACHED_MASK]
    return EncoderOutput(inputs[CACHED], None if bool(mask.all()) else mask)
