"""Any ``timm.create_model`` backbone as an image encoder, features from ``forward_features``.

This module owns building the model headless (``num_classes=0``), loading a local weight file into
it, timm's eval preprocessing, and turning ``forward_features`` into a token sequence: a CNN map
``[B, C, H, W]`` (or ``[B, H, W, C]`` for NHWC models such as Swin) becomes ``[B, H*W, C]``; a ViT's
``[B, N, D]`` is kept, optionally without its class / register tokens.

Weight files may be named differently from timm (the original EfficientNet-Lite release, say):
``mmpost.weights.load_matching`` then maps them by position. Files that carry a classifier are
loaded into the model with its head, which is then removed.

Token counts are found by running ``forward_features`` on a meta-device copy of the architecture,
so they are exact for any model and never touch the live (possibly sharded or on-GPU) weights.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import timm
import timm.data
import torch
from PIL import Image
from torch import nn

from mmpost.interfaces import Encoder, EncoderOutput, MediaProcessor
from mmpost.weights import load_matching, load_state_dict_file

logger = logging.getLogger(__name__)


class TransformProcessor(MediaProcessor):
    """A torchvision-style transform applied to one RGB image: PIL image -> ``[C, H, W]`` float32.

    Args:
        transform: the eval transform (a picklable ``Compose``).
    """

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, raw: Any) -> torch.Tensor:
        if isinstance(raw, Image.Image) and raw.mode != "RGB":
            raw = raw.convert("RGB")  # timm's transforms keep the mode; the model wants 3 channels
        return self.transform(raw).float()


class TimmEncoder(Encoder):
    """A timm model without its classifier; tokens from ``forward_features``.

    Args:
        model: timm model name (``timm.list_models()``), e.g. "efficientnet_lite0", "vit_small_patch16_224".
        weights: local weight file (``.safetensors``, or ``.pth`` / ``.pt`` / ``.bin`` read with
            ``weights_only=True``), possibly a ``pkg:`` path; matched by name, else by position.
            None leaves the random initialisation (nothing is ever downloaded).
        image_size: input side length; sets the preprocessing size and, for models with a fixed
            input size (ViTs), resizes the model (position embeddings are resampled after loading).
            None uses the model's own size.
        model_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. ``img_size``,
            ``depth``, ``dynamic_img_size``).
        drop_prefix_tokens: drop a ViT's class / register tokens (``num_prefix_tokens`` of them).

    Raises:
        FileNotFoundError: if ``weights`` does not exist.
        ValueError: if the weights fit the model neither by name nor by position, or
            ``drop_prefix_tokens`` is set on a model without prefix tokens.
    """

    def __init__(
        self,
        model: str,
        weights: str | None = None,
        image_size: int | None = None,
        model_kwargs: dict | None = None,
        drop_prefix_tokens: bool = False,
    ) -> None:
        super().__init__()
        self.model_name = model
        self.image_size = image_size
        self.model_kwargs = dict(model_kwargs or {})
        self.drop_prefix_tokens = drop_prefix_tokens

        if weights is None:
            self.model = self._create(num_classes=0)
        else:
            self.model = self._create_loaded(weights)
        if image_size is not None and hasattr(self.model, "set_input_size"):
            self.model.set_input_size(img_size=(image_size, image_size))
        self.model.eval()  # timm builds in train mode; BatchNorm must not update statistics by default

        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0))
        if drop_prefix_tokens and self.num_prefix_tokens == 0:
            raise ValueError(f"timm {model}: drop_prefix_tokens=True, but the model has no class or register tokens")
        self.output_dim = int(self.model.num_features)
        # NHWC models (Swin, ...) say so; the rest give NCHW maps
        self._channels_last = str(getattr(self.model, "output_fmt", "NCHW")).endswith("NHWC")
        self._token_counts: dict[tuple[int, ...], int] = {}

        self._data_config = timm.data.resolve_data_config(self._size_override(), model=self.model)

    def _create(self, **kwargs: Any) -> nn.Module:
        return timm.create_model(self.model_name, pretrained=False, **{**self.model_kwargs, **kwargs})

    def _create_loaded(self, weights: str) -> nn.Module:
        state = load_state_dict_file(weights)
        model = self._create(num_classes=0)
        num_tensors = sum(1 for k in model.state_dict() if not k.endswith("num_batches_tracked"))
        num_given = sum(1 for k in state if not k.endswith("num_batches_tracked"))
        if num_given > num_tensors:
            # Released checkpoints carry their classifier: load into the model with its head, then drop it.
            model = self._create()
            how = load_matching(model, state, weights)
            model.reset_classifier(0)
        else:
            how = load_matching(model, state, weights)
        logger.info("timm %s: loaded %s %s", self.model_name, weights, how)
        return model

    def _size_override(self) -> dict[str, Any]:
        if self.image_size is not None:
            return {"input_size": (3, self.image_size, self.image_size)}
        # A ViT built with img_size=... keeps the pretrained config's input size; trust the model instead.
        native = getattr(getattr(self.model, "patch_embed", None), "img_size", None)
        return {"input_size": (3, *native)} if native is not None else {}

    @property
    def data_config(self) -> dict[str, Any]:
        """timm's resolved eval data config (input_size, interpolation, mean, std, crop_pct, crop_mode)."""
        return dict(self._data_config)

    def preprocessor(self) -> MediaProcessor:
        return TransformProcessor(timm.data.create_transform(**self._data_config, is_training=False))

    def forward(self, inputs: torch.Tensor) -> EncoderOutput:
        pixels = inputs.to(next(self.model.parameters()).dtype)  # [B, C, H, W], e.g. bf16 when the model is
        return EncoderOutput(features=self._tokens(self.model, pixels))

    def _tokens(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        features = model.forward_features(inputs)
        if not isinstance(features, torch.Tensor):  # multi-scale models (CrossViT, ...) return a list
            kind = type(features).__name__
            raise ValueError(f"timm {self.model_name}: forward_features returns a {kind}, not one feature tensor")
        if features.ndim == 4:
            if self._channels_last:
                return features.flatten(1, 2)  # [B, H, W, C] -> [B, H*W, C]
            return features.flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, H*W, C]
        if self.drop_prefix_tokens:
            features = features[:, self.num_prefix_tokens :]  # [B, N - prefix, D]
        return features  # [B, N, D]

    def num_tokens(self, input_shape: Sequence[int]) -> int:
        shape = tuple(int(s) for s in input_shape)
        if shape not in self._token_counts:
            # Architecture only, on the meta device: no memory, no compute, and the live weights are untouched.
            with torch.device("meta"):
                twin = self._create(num_classes=0)
                if self.image_size is not None and hasattr(twin, "set_input_size"):
                    twin.set_input_size(img_size=(self.image_size, self.image_size))
                tokens = self._tokens(twin.eval(), torch.zeros(1, *shape))
            self._token_counts[shape] = tokens.shape[1]
        return self._token_counts[shape]

    def spec(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "weights": None,
            "image_size": self.image_size,
            "model_kwargs": dict(self.model_kwargs),
            "drop_prefix_tokens": self.drop_prefix_tokens,
        }

    def block_classes(self) -> tuple[type[nn.Module], ...]:
        # Best effort: the repeated units under `blocks` (ViTs; EfficientNets nest them one level),
        # `stages` (ConvNeXt, ...) or `layers` (Swin).
        container = next(
            (getattr(self.model, name) for name in ("blocks", "stages", "layers") if hasattr(self.model, name)), None
        )
        if not isinstance(container, (nn.Sequential, nn.ModuleList)):
            return ()
        classes: dict[type[nn.Module], None] = {}
        for unit in container:
            inner = unit if isinstance(unit, (nn.Sequential, nn.ModuleList)) else [unit]
            for block in inner:
                classes[type(block)] = None
        return tuple(classes)
