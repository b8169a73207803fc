"""BLIP-2's and InstructBLIP's vision tower (an EVA-style ViT with a CLS token), as an encoder whose features are
what they feed their Q-Former.

Features are the tower's ``last_hidden_state``: every token (CLS first, then the patches) after the tower's
post-layernorm, as ``Blip2ForConditionalGeneration.get_image_features`` reads them. This differs from
``hf_vision`` (LLaVA's reading: one hidden layer before the post-layernorm, CLS dropped), hence its own module.
Preprocessing is the checkpoint's image processor itself (``BlipImageProcessor``), so an export sees the pixels
mmpost saw.

``instructblip_vision`` is the same tower with InstructBLIP's second input: the instruction (the text of the
message holding the image) tokenized by the Q-Former's own tokenizer, which the encoder passes on to an
``instruct_qformer`` connector as ``EncoderOutput.context``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import transformers
from torch import nn
from transformers import (
    AutoTokenizer,
    BaseImageProcessor,
    Blip2VisionConfig,
    Blip2VisionModel,
    BlipImageProcessor,
    InstructBlipVisionConfig,
    InstructBlipVisionModel,
    PreTrainedTokenizerBase,
)
from transformers.models.blip_2.modeling_blip_2 import Blip2EncoderLayer
from transformers.models.instructblip.modeling_instructblip import InstructBlipEncoderLayer

from mmpost.encoders.hf_vision import HFImageProcessor
from mmpost.interfaces import Encoder, EncoderOutput, MediaBatch, MediaProcessor
from mmpost.weights import resolve_path


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

    name: ClassVar[str] = "blip_vision"
    config_class: ClassVar[type] = Blip2VisionConfig
    model_class: ClassVar[type] = Blip2VisionModel
    layer_class: ClassVar[type] = Blip2EncoderLayer

    def __init__(self, config: dict, processor: dict | None = None) -> None:
        super().__init__()
        model_type = config.get("model_type", self.config_class.model_type)
        if model_type != self.config_class.model_type:
            raise ValueError(
                f"{self.name}: config model_type {model_type!r}; expected {self.config_class.model_type!r}"
            )
        vision_config = self.config_class.from_dict({k: v for k, v in config.items() if k != "model_type"})
        self.model = self.model_class(vision_config).eval()
        self._image_processor = _image_processor(processor, vision_config)
        self.output_dim = vision_config.hidden_size

    @classmethod
    def from_tower(cls, tower: nn.Module, image_processor: BaseImageProcessor, **options: Any) -> BlipVisionEncoder:
        """The encoder around a released model's loaded tower, holding its tensors without a copy or a random
        initialisation first; ``options`` are the other constructor arguments."""
        with torch.device("meta"):
            encoder = cls(config=tower.config.to_dict(), **options)
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
        return (self.layer_class,)


@dataclass
class InstructedImage:
    """One preprocessed image with the instruction its Q-Former reads.

    Attributes:
        pixel_values: ``[C, H, W]`` float32.
        instruction_ids: the instruction's ids in the Q-Former's vocabulary.
    """

    pixel_values: torch.Tensor
    instruction_ids: list[int]

    @property
    def shape(self) -> torch.Size:
        return self.pixel_values.shape


class InstructionProcessor(MediaProcessor):
    """The image processor and the Q-Former's tokenizer: (image, instruction) -> ``InstructedImage``; a batch
    is the stacked pixels and the instructions padded on the right, as InstructBLIP's processor pads them."""

    reads_text = True

    def __init__(self, image_processor: BaseImageProcessor, tokenizer: PreTrainedTokenizerBase) -> None:
        self.image = HFImageProcessor(image_processor)
        self.tokenizer = tokenizer

    def __call__(self, raw: Any, text: str = "") -> InstructedImage:
        ids = self.tokenizer(text, truncation=True)["input_ids"]
        return InstructedImage(self.image(raw), ids)

    def collate(self, items: Sequence[InstructedImage]) -> MediaBatch:
        width = max(len(item.instruction_ids) for item in items)
        ids = torch.full((len(items), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, item in enumerate(items):
            ids[i, : len(item.instruction_ids)] = torch.tensor(item.instruction_ids, dtype=torch.long)
            mask[i, : len(item.instruction_ids)] = 1
        pixels = torch.stack([item.pixel_values for item in items])
        return {"pixel_values": pixels, "instruction_ids": ids, "instruction_mask": mask}


class InstructBlipVisionEncoder(BlipVisionEncoder):
    """An ``InstructBlipVisionModel`` (features as ``blip_vision``'s) whose inputs carry the instruction tokens.

    Args:
        config: the vision config dict (``model_type`` "instructblip_vision_model").
        processor: the image processor dict, as for ``blip_vision``.
        tokenizer: the Q-Former's tokenizer: a directory (``save_pretrained``; may be a ``pkg:`` path), the
            ``{file name: text}`` of its files as ``spec()`` writes them, or a loaded tokenizer.

    Raises:
        ValueError: as ``blip_vision``; or a tokenizer without a pad token.
    """

    name = "instructblip_vision"
    config_class = InstructBlipVisionConfig
    model_class = InstructBlipVisionModel
    layer_class = InstructBlipEncoderLayer

    def __init__(
        self, config: dict, processor: dict | None = None, tokenizer: str | dict | PreTrainedTokenizerBase | None = None
    ) -> None:
        super().__init__(config, processor)
        if tokenizer is None:
            raise ValueError("instructblip_vision: give the Q-Former's `tokenizer` (a tokenizer directory)")
        self.tokenizer = _load_tokenizer(tokenizer)
        if self.tokenizer.pad_token_id is None:
            raise ValueError("instructblip_vision: the Q-Former's tokenizer has no pad token")

    def preprocessor(self) -> MediaProcessor:
        return InstructionProcessor(self._image_processor, self.tokenizer)

    def forward(self, inputs: MediaBatch) -> EncoderOutput:
        out = super().forward(inputs["pixel_values"])
        out.context = {"input_ids": inputs["instruction_ids"], "attention_mask": inputs["instruction_mask"]}
        return out

    def spec(self) -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as scratch:
            self.tokenizer.save_pretrained(scratch)
            files = {path.name: path.read_text() for path in sorted(Path(scratch).iterdir()) if path.is_file()}
        return super().spec() | {"tokenizer": files}


def _load_tokenizer(tokenizer: str | dict | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    if isinstance(tokenizer, str):
        return AutoTokenizer.from_pretrained(resolve_path(tokenizer))
    with tempfile.TemporaryDirectory() as scratch:
        for name, text in tokenizer.items():
            (Path(scratch) / Path(name).name).write_text(text)
        return AutoTokenizer.from_pretrained(scratch)


def _image_processor(processor: dict | None, vision_config: Blip2VisionConfig) -> BaseImageProcessor:
    if processor is None:
        size = vision_config.image_size
        return BlipImageProcessor(size={"height": size, "width": size})
    name = processor.get("image_processor_type", BlipImageProcessor.__name__)
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, BaseImageProcessor)):
        raise ValueError(f"blip_vision: processor names image_processor_type={name!r}, not a transformers class")
    return cls.from_dict(dict(processor))
