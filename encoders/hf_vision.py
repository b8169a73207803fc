"""transformers CLIP and SigLIP vision towers, read the way LLaVA reads them.

This module owns loading a tower from a ``save_pretrained`` directory (a vision-only model or the
vision half of a full CLIP / SigLIP model), its preprocessing, and the choice of feature layer.

Features follow ``LlavaModel.get_image_features``: ``hidden_states[feature_layer]`` of the tower,
where ``hidden_states[0]`` is the embeddings output and ``hidden_states[i]`` the output of layer
``i``; no post-layernorm is applied, and the CLS token is dropped for CLIP (LLaVA's "default"
select strategy). Preprocessing is the transformers image processor itself, so that a LLaVA export
(``LlavaForConditionalGeneration`` plus this processor) sees exactly the pixels mmpost saw.

In transformers 5 the vision models hold their layers directly (``embeddings``, ``encoder``,
``post_layernorm``; no ``vision_model.`` level), so this encoder's state-dict keys are
``model.embeddings...``, ``model.encoder.layers.N...``. Checkpoints with the older
``vision_model.`` prefix still load through ``from_pretrained``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    BaseImageProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    PretrainedConfig,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

from mmpost.interfaces import Encoder, EncoderOutput, MediaProcessor
from mmpost.weights import is_hub_id, locate_pretrained

# family -> (vision config class, vision model class, default image processor class, layer class)
_FAMILIES: dict[str, tuple[type[PretrainedConfig], type[nn.Module], type[BaseImageProcessor], type[nn.Module]]] = {
    "clip": (CLIPVisionConfig, CLIPVisionModel, CLIPImageProcessor, CLIPEncoderLayer),
    "siglip": (SiglipVisionConfig, SiglipVisionModel, SiglipImageProcessor, SiglipEncoderLayer),
}
# config.json model_type -> family; full models hold the tower's config under ``vision_config``
_MODEL_TYPES = {
    "clip_vision_model": "clip",
    "clip": "clip",
    "siglip_vision_model": "siglip",
    "siglip": "siglip",
}


class HFImageProcessor(MediaProcessor):
    """A transformers image processor applied to one image: PIL image -> ``[C, H, W]`` float32.

    Args:
        image_processor: the transformers image processor (picklable, so this is too).
    """

    def __init__(self, image_processor: BaseImageProcessor) -> None:
        self.image_processor = image_processor

    def __call__(self, raw: Any) -> torch.Tensor:
        pixel_values = self.image_processor(images=raw, return_tensors="pt")["pixel_values"]  # [1, C, H, W]
        return pixel_values[0].float()


class HFVisionEncoder(Encoder):
    """A transformers CLIP or SigLIP vision tower, features from one hidden layer.

    Args:
        path: directory written by ``save_pretrained`` (or a hub id, fetched once and then read from
            the cache; with no network only a cached one loads) holding a ``CLIPVisionModel``,
            ``SiglipVisionModel``, or a full ``CLIPModel`` / ``SiglipModel`` (its vision tower is
            taken); may be a ``pkg:`` path. A ``preprocessor_config.json`` there is used for
            preprocessing. Exactly one of ``path`` and ``config`` is given.
        config: vision config dict (``model_type`` "clip_vision_model" or "siglip_vision_model",
            as ``spec()`` writes it); builds the tower with random weights and reads no files.
        feature_layer: index into the tower's ``hidden_states`` (LLaVA's ``vision_feature_layer``):
            0 is the embeddings output, ``i`` the output of layer ``i``, -1 the last layer, -2
            (default, LLaVA-1.5) the one before it.
        drop_cls: drop the first token (LLaVA's "default" select strategy). None means True for
            CLIP and False for SigLIP, which has no CLS token; True for SigLIP is an error.
        processor: image processor dict (``to_dict()`` of a transformers image processor, its class
            named by ``image_processor_type``); overrides the one found at ``path``.

    Raises:
        FileNotFoundError: if ``path`` does not exist or holds no ``config.json``, or is a hub id that
            is neither cached nor reachable (offline mode, or no connection to the hub).
        ValueError: on an unsupported model type, an out-of-range ``feature_layer``, both or neither
            of ``path`` / ``config``, or ``drop_cls=True`` on SigLIP.
    """

    def __init__(
        self,
        path: str | None = None,
        config: dict | None = None,
        feature_layer: int = -2,
        drop_cls: bool | None = None,
        processor: dict | None = None,
    ) -> None:
        super().__init__()
        if (path is None) == (config is None):
            raise ValueError("hf_vision: give exactly one of `path` (a saved checkpoint) or `config` (a vision config)")
        directory = _checkpoint_dir(path) if path is not None else None
        if directory is not None:
            self._family, vision_config = _read_config(directory)
        else:
            self._family, vision_config = _config_from_dict(config)
        _, model_cls, processor_cls, _ = _FAMILIES[self._family]

        num_layers = vision_config.num_hidden_layers
        if not -(num_layers + 1) <= feature_layer <= num_layers:
            raise ValueError(
                f"hf_vision: feature_layer={feature_layer} is outside the {num_layers + 1} hidden states of this "
                f"{num_layers}-layer tower (valid: {-(num_layers + 1)}..{num_layers})"
            )
        if drop_cls is None:
            drop_cls = self._family == "clip"
        if drop_cls and self._family == "siglip":
            raise ValueError(
                "hf_vision: drop_cls=True on a SigLIP tower would drop a patch: SigLIP has no CLS token "
                "(it pools with an attention head instead), so every token is an image patch. "
                "Leave drop_cls unset or set it to False."
            )
        self._feature_layer = feature_layer
        self._drop_cls = drop_cls

        if directory is not None:
            self.model = _load_tower(model_cls, directory, vision_config)
        else:
            self.model = model_cls(vision_config)
        self.model.eval()  # from_pretrained returns eval mode; match it when built from a config
        self._image_processor = _make_image_processor(processor, directory, processor_cls, vision_config)
        self.output_dim = vision_config.hidden_size

    @classmethod
    def from_tower(
        cls, tower: nn.Module, feature_layer: int, drop_cls: bool | None, processor: BaseImageProcessor
    ) -> HFVisionEncoder:
        """The encoder around an already loaded ``CLIPVisionModel`` / ``SiglipVisionModel`` (a released VLM's
        tower), holding its tensors without a copy or a random initialisation first."""
        with torch.device("meta"):
            encoder = cls(config=tower.config.to_dict(), feature_layer=feature_layer, drop_cls=drop_cls)
        encoder.model = tower.float().eval()
        encoder._image_processor = processor
        return encoder

    @property
    def model_type(self) -> str:
        """The tower family: "clip" or "siglip"."""
        return self._family

    @property
    def feature_layer(self) -> int:
        return self._feature_layer

    @property
    def drop_cls(self) -> bool:
        return self._drop_cls

    def image_processor(self) -> BaseImageProcessor:
        """The transformers image processor (what a LLaVA export saves next to the model)."""
        return self._image_processor

    def preprocessor(self) -> MediaProcessor:
        return HFImageProcessor(self._image_processor)

    def forward(self, inputs: torch.Tensor) -> EncoderOutput:
        pixel_values = inputs.to(self.model.embeddings.patch_embedding.weight.dtype)  # [B, C, H, W]
        hidden_states = self.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        features = hidden_states[self._feature_layer]  # [B, 1 + P, D] for CLIP, [B, P, D] for SigLIP
        if self._drop_cls:
            features = features[:, 1:]  # [B, P, D]
        return EncoderOutput(features=features)

    def num_tokens(self, input_shape: Sequence[int]) -> int:
        _, height, width = input_shape
        patch = self.model.config.patch_size
        cls_kept = self._family == "clip" and not self._drop_cls
        return (height // patch) * (width // patch) + int(cls_kept)

    def spec(self) -> dict[str, Any]:
        return {
            "config": self.model.config.to_dict(),
            "feature_layer": self._feature_layer,
            "drop_cls": self._drop_cls,
            "processor": self._image_processor.to_dict(),
        }

    def block_classes(self) -> tuple[type[nn.Module], ...]:
        return (_FAMILIES[self._family][3],)


def _checkpoint_dir(path: str) -> Path:
    # a local or pkg: folder, a hub id's cached snapshot, or (only when the hub can be reached) a hub id to fetch;
    # LLaVA configs name their towers by hub id
    where = locate_pretrained(path, "hf_vision path")
    directory = _hub_download(where) if is_hub_id(where) else Path(where)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"hf_vision: {path} has no config.json; expected a directory written by save_pretrained "
            "(CLIPVisionModel, SiglipVisionModel, CLIPModel or SiglipModel)"
        )
    return directory


def _hub_download(repo_id: str) -> Path:
    """Fetches the files a tower needs into the hub cache, where later runs find them with no network."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except Exception as err:  # the hub answered but cannot serve it: no such repo, gated, ...
        raise FileNotFoundError(f"hf_vision: {repo_id} could not be fetched from the hub ({err})") from None


def _family_of(model_type: str | None, source: str) -> str:
    if model_type not in _MODEL_TYPES:
        raise ValueError(
            f"hf_vision: {source} has model_type {model_type!r}; supported: {', '.join(sorted(_MODEL_TYPES))}"
        )
    return _MODEL_TYPES[model_type]


def _read_config(directory: Path) -> tuple[str, PretrainedConfig]:
    config = AutoConfig.from_pretrained(directory)
    family = _family_of(config.model_type, str(directory))
    # a full CLIP/SigLIP checkpoint: keep only its vision half
    return family, getattr(config, "vision_config", config)


def _config_from_dict(config: dict) -> tuple[str, PretrainedConfig]:
    family = _family_of(config.get("model_type"), "config")
    config_cls = _FAMILIES[family][0]
    if config.get("model_type") in ("clip", "siglip"):
        config = config["vision_config"]
    return family, config_cls.from_dict(dict(config))


@contextmanager
def _quiet_transformers_loading() -> Iterator[None]:
    # from_pretrained logs every text-tower key of a full CLIP checkpoint as "unexpected"; we check
    # the keys that matter (missing ones) ourselves.
    # A filter rather than a level: transformers runs extra checks (and warns from another logger)
    # when this logger's level is WARNING or above.
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(_errors_only)
    try:
        yield
    finally:
        logger.removeFilter(_errors_only)


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def _load_tower(model_cls: type[nn.Module], directory: Path, vision_config: PretrainedConfig) -> nn.Module:
    # float32 whatever the checkpoint holds: mixed precision is the trainer's business
    with _quiet_transformers_loading():
        model, info = model_cls.from_pretrained(
            directory, config=vision_config, dtype=torch.float32, output_loading_info=True
        )
    missing = sorted(info["missing_keys"])
    if missing or info["mismatched_keys"]:
        raise ValueError(
            f"hf_vision: {directory} does not hold a complete {model_cls.__name__}: "
            f"{len(missing)} missing tensors (e.g. {missing[:3]}), mismatched: {sorted(info['mismatched_keys'])[:3]}"
        )
    return model


def _make_image_processor(
    processor: dict | None,
    directory: Path | None,
    default_cls: type[BaseImageProcessor],
    vision_config: PretrainedConfig,
) -> BaseImageProcessor:
    if processor is not None:
        name = processor.get("image_processor_type", default_cls.__name__)
        cls = getattr(transformers, name, None)
        if not (isinstance(cls, type) and issubclass(cls, BaseImageProcessor)):
            raise ValueError(f"hf_vision: processor names image_processor_type={name!r}, not a transformers class")
        return cls.from_dict(dict(processor))
    if directory is not None and (directory / "preprocessor_config.json").is_file():
        return AutoImageProcessor.from_pretrained(directory)
    # No saved processor: the family's processor sized to the tower, as the original checkpoints ship it.
    size = vision_config.image_size
    if default_cls is CLIPImageProcessor:
        return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return default_cls(size={"height": size, "width": size})
