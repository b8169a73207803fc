"""The vision tower of Qwen2-VL and Qwen2.5-VL (patching, 2-D rotary positions, Qwen2.5's windowed attention,
any resolution), as an encoder whose features are the tower's last hidden states before its patch merger.

The tower is transformers' own module, run by its own ``forward``; only its merger is swapped for a view
that groups each ``merge x merge`` unit of patches into one row, so the tower's output (``pooler_output``,
restored from Qwen2.5's window order by the tower itself) is every patch's feature in the processor's
order. The merger becomes the ``patch_merger`` connector, which reads those units. A checkpoint's tower and
merger thus compute exactly what ``Qwen2VLModel.get_image_features`` computes.

Preprocessing is the checkpoint's image processor (dynamic resolution: each image keeps its aspect ratio
and becomes ``t x h x w`` patches of ``C * temporal_patch * patch * patch`` values). One processed image is
``[t, h, w, patch_values]`` (the patches in the processor's order, the grid in the shape), so its number of
features is ``t * h * w``; a batch is ``{"grid_thw": [K, 3], "pixel_values": [sum of patches, values]}``.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch
import transformers
from torch import nn
from transformers import BaseImageProcessor

from mmpost.interfaces import Encoder, EncoderOutput, MediaBatch, MediaProcessor

# vision config model_type -> (config class, tower class, layer class), looked up in transformers by name
_TOWERS = {
    "qwen2_vl": (
        "Qwen2VLVisionConfig",
        "transformers.models.qwen2_vl.modeling_qwen2_vl:Qwen2VisionTransformerPretrainedModel",
        "transformers.models.qwen2_vl.modeling_qwen2_vl:Qwen2VLVisionBlock",
    ),
    "qwen2_5_vl": (
        "Qwen2_5_VLVisionConfig",
        "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VisionTransformerPretrainedModel",
        "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLVisionBlock",
    ),
}
_CONFIG_TYPES = {
    "qwen2_vl": "qwen2_vl",
    "qwen2_vl_vision": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen2_5_vl_vision": "qwen2_5_vl",
}


def _load(target: str) -> type:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


class MergeUnits(nn.Module):
    """Stands in for the tower's patch merger: ``[N, D]`` patches to ``[N / unit, unit * D]`` rows, one per merge
    unit, so the tower's own reordering of merged rows (Qwen2.5's windows) restores the patches' order."""

    def __init__(self, unit: int) -> None:
        super().__init__()
        self.unit = unit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, self.unit * x.shape[-1])


class QwenVisionProcessor(MediaProcessor):
    """PIL image -> ``[t, h, w, patch_values]`` with the checkpoint's image processor (picklable)."""

    def __init__(self, image_processor: BaseImageProcessor) -> None:
        self.image_processor = image_processor

    def __call__(self, raw: Any) -> torch.Tensor:
        out = self.image_processor(images=[raw], return_tensors="pt")
        t, h, w = (int(x) for x in out["image_grid_thw"][0])
        return out["pixel_values"].float().reshape(t, h, w, -1)

    def collate(self, items: Sequence[torch.Tensor]) -> MediaBatch:
        # grid_thw first: the number of media in a batch is the first value's length (mmpost.interfaces.media_count)
        grids = torch.tensor([list(item.shape[:3]) for item in items], dtype=torch.long)
        return {"grid_thw": grids, "pixel_values": torch.cat([item.reshape(-1, item.shape[-1]) for item in items])}


class QwenVisionEncoder(Encoder):
    """Qwen2-VL's / Qwen2.5-VL's vision tower without its merger; one feature per patch.

    Args:
        config: the vision config dict (``model_type`` "qwen2_vl" / "qwen2_5_vl" or their ``_vision`` types, as
            ``spec()`` writes it); builds the tower with random weights.
        processor: the image processor dict (``to_dict()`` of ``Qwen2VLImageProcessor``, its class named by
            ``image_processor_type``); by default Qwen2-VL's processor for the tower's patch sizes.

    Raises:
        ValueError: on a config of another model type.
    """

    def __init__(self, config: dict, processor: dict | None = None) -> None:
        super().__init__()
        family = _CONFIG_TYPES.get(config.get("model_type"))
        if family is None:
            raise ValueError(
                f"qwen2_vl encoder: config model_type {config.get('model_type')!r}; "
                f"supported: {', '.join(sorted(_CONFIG_TYPES))}"
            )
        config_cls = getattr(transformers, _TOWERS[family][0])
        vision_config = config_cls.from_dict({k: v for k, v in config.items() if k != "model_type"})
        self.family = family
        self.tower = _load(_TOWERS[family][1])._from_config(vision_config)
        self.unit = vision_config.spatial_merge_size**2
        self.tower.merger = MergeUnits(self.unit)
        self.tower.eval()
        # the tower's width: Qwen2-VL calls it embed_dim (hidden_size is the LLM's), Qwen2.5-VL hidden_size
        self.width = vision_config.hidden_size if family == "qwen2_5_vl" else vision_config.embed_dim
        self.output_dim = self.width
        self._image_processor = _image_processor(processor, vision_config)

    @classmethod
    def from_tower(cls, tower: nn.Module, image_processor: BaseImageProcessor) -> QwenVisionEncoder:
        """The encoder around a released model's loaded tower (its merger goes to the connector), sharing its
        tensors with no random initialisation first."""
        with torch.device("meta"):
            encoder = cls(config=tower.config.to_dict() | {"model_type": _model_type(tower)})
        tower.merger = MergeUnits(encoder.unit)
        encoder.tower = tower.float().eval()
        encoder._image_processor = image_processor
        return encoder

    @property
    def merge_size(self) -> int:
        return self.tower.config.spatial_merge_size

    def image_processor(self) -> BaseImageProcessor:
        return self._image_processor

    def preprocessor(self) -> MediaProcessor:
        return QwenVisionProcessor(self._image_processor)

    def forward(self, inputs: MediaBatch) -> EncoderOutput:
        grids = inputs["grid_thw"]
        pixel_values = inputs["pixel_values"].to(self.tower.patch_embed.proj.weight.dtype)
        units = self.tower(hidden_states=pixel_values, grid_thw=grids).pooler_output  # [sum N / unit, unit * D]
        patches = units.reshape(-1, self.width)  # [sum N, D] in the processor's order
        counts = grids.prod(-1).tolist()
        longest = max(counts)
        features = patches.new_zeros(len(counts), longest, self.width)
        mask = torch.zeros(len(counts), longest, dtype=torch.bool, device=patches.device)
        for k, chunk in enumerate(patches.split(counts)):
            features[k, : chunk.shape[0]] = chunk
            mask[k, : chunk.shape[0]] = True
        return EncoderOutput(features=features, mask=mask)

    def num_tokens(self, input_shape: Sequence[int]) -> int:
        t, h, w, _ = input_shape
        return int(t * h * w)

    def spec(self) -> dict[str, Any]:
        return {
            "config": self.tower.config.to_dict() | {"model_type": self.family},
            "processor": self._image_processor.to_dict(),
        }

    def block_classes(self) -> tuple[type[nn.Module], ...]:
        return (_load(_TOWERS[self.family][2]),)


def _model_type(tower: nn.Module) -> str:
    return _CONFIG_TYPES[tower.config.model_type]


def _image_processor(processor: dict | None, vision_config: Any) -> BaseImageProcessor:
    if processor is not None:
        name = processor.get("image_processor_type", "Qwen2VLImageProcessor")
        cls = getattr(transformers, name, None)
        if not (isinstance(cls, type) and issubclass(cls, BaseImageProcessor)):
            raise ValueError(f"qwen2_vl encoder: image_processor_type={name!r} is not a transformers image processor")
        return cls.from_dict(dict(processor))
    return transformers.Qwen2VLImageProcessor(
        patch_size=vision_config.patch_size,
        temporal_patch_size=vision_config.temporal_patch_size,
        merge_size=vision_config.spatial_merge_size,
    )
