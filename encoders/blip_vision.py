"""BLIP-2's vision tower (an EVA-style ViT with a CLS token), as an encoder whose features are what BLIP-2 feeds
its Q-Former.

Features are the tower's ``last_hidden_state``: every token (CLS first, then the patches) after the tower's
post-layernorm, as ``Blip2ForConditionalGeneration.get_image_features`` reads them. This differs from
``hf_vision`` (LLaVA's reading: one hidden layer before the post-layernorm, CLS dropped), hence its own module.
Preprocessing is the checkpoint's image processor itself (``BlipImageProcessor``), so an export sees the pixels
mmpost saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import transformers
from torch import nn
from transformers import BaseImageProcessor, Blip2VisionConfig, Blip2VisionModel, BlipImageProcessor
from transformers.models.blip_2.modeling_blip_2 import Blip2EncoderLayer

from mmpost.encoders.hf_vision import HFImageProcessor
from mmpost.interfaces import Encoder, EncoderOutput, MediaProcessor


class BlipVisionEncoder(Encoder):
    """A ``Blip2VisionModel``; one feature per token (CLS and patches), after the post-layernorm.

    Args:
        config: the vision config dict (``model_type`` "blip_2_vision_model", as ``spec()`` writes it); builds
            the tower with random weights and reads no files.
        processor: the image processor dict (``to_dict()`` of a transformers image processor, its class named by
            ``image_processor_type``); by default a ``BlipImageProcessor`` sized to the tower.

    Raises:
        ValueError: on a config of another model type, or a processor dict naming no transformers class.
    """

    def __init__(self, config: dict, processor: dict | None = None) -> None:
        super().__init__()
        model_type = config.get("model_type", Blip2VisionConfig.model_type)
        if model_type != Blip2VisionConfig.model_type:
            raise ValueError(
                f"blip_vision: config model_type {model_type!r}; expected {Blip2VisionConfig.model_type!r}"
            )
        vision_config = Blip2VisionConfig.from_dict({k: v for k, v in config.items() if k != "model_type"})
        self.model = Blip2VisionModel(vision_config).eval()
        self._image_processor = _image_processor(processor, vision_config)
        self.output_dim = vision_config.hidden_size

    @classmethod
    def from_tower(cls, tower: nn.Module, image_processor: BaseImageProcessor) -> BlipVisionEncoder:
        """The encoder around a released model's loaded tower, holding its tensors without a copy or a random
        initialisation first."""
        with torch.device("meta"):
            encoder = cls(config=tower.config.to_dict())
        encoder.model = tower.float().eval()
        encoder._image_processor = image_processor
        return encoder

    def image_processor(self) -> BaseImageProcessor:
        """The transformers image processor (what a BLIP-2 export saves next to the model)."""
        return self._image_processor

    def preprocessor(self) -> MediaProcessor:
        return HFImageProcessor(self._image_processor)

    def forward(self, inputs: torch.Tensor) -> EncoderOutput:
        pixel_values = inputs.to(self.model.embeddings.patch_embedding.weight.dtype)  # [B, C, H, W]
        return EncoderOutput(features=self.model(pixel_values=pixel_values).last_hidden_state)  # [B, 1 + P, D]

    def num_tokens(self, input_shape: Sequence[int]) -> int:
        _, height, width = input_shape
        patch = self.model.config.patch_size
        return (height // patch) * (width // patch) + 1

    def spec(self) -> dict[str, Any]:
        return {"config": self.model.config.to_dict(), "processor": self._image_processor.to_dict()}

    def block_classes(self) -> tuple[type[nn.Module], ...]:
        return (Blip2EncoderLayer,)


def _image_processor(processor: dict | None, vision_config: Blip2VisionConfig) -> BaseImageProcessor:
    if processor is None:
        size = vision_config.image_size
        return BlipImageProcessor(size={"height": size, "width": size})
    name = processor.get("image_processor_type", BlipImageProcessor.__name__)
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, BaseImageProcessor)):
        raise ValueError(f"blip_vision: processor names image_processor_type={name!r}, not a transformers class")
    return cls.from_dict(dict(processor))
