"""The vision tower of an open_clip architecture as an image encoder.

This module owns building only the tower (the text tower is never built), loading a local weight
file of the full model or of the tower alone, open_clip's validation preprocessing, and reading one
intermediate layer's tokens through the tower's ``forward_intermediates``.

All three open_clip tower families work: its own ``VisionTransformer``, ``ModifiedResNet`` (the
OpenAI RN50 family) and ``TimmModel`` (timm trunks: ConvNeXt, SigLIP and EVA ViTs, ...). Conv maps
``[B, C, H, W]`` are flattened to ``[B, H*W, C]``. ``feature_layer`` counts what
``forward_intermediates`` counts: transformer blocks for ViTs, and (stem, layer1, ..., layer4) for
ModifiedResNet. The tokens are the raw block outputs: ``ln_post`` and the attention / projection
heads are not applied (as LLaVA reads transformers towers), so the last block of a ViT is
``feature_layer=-1`` and ``-2`` is the same layer as transformers' ``hidden_states[-2]``.

Architectures come from open_clip's built-in configs by name or from a ``model_cfg`` dict in
open_clip's own format (``{"embed_dim", "vision_cfg", "text_cfg"}``), which is also what ``spec()``
writes, so rebuilding needs neither files nor ``open_clip.add_model_config``. The tower is built with
``open_clip.model._build_vision_tower``, the function ``CLIP`` and ``CustomTextCLIP`` use for their
``visual``: ``create_model`` has no way to skip the text tower.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from copy import deepcopy
from dataclasses import asdict
from typing import Any

import open_clip
import torch
from open_clip.model import _build_vision_tower
from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from open_clip.transformer import VisionTransformer
from torch import nn

from mmpost.interfaces import Encoder, EncoderOutput, MediaProcessor
from mmpost.weights import load_state_dict_file

logger = logging.getLogger(__name__)

# What may be set in preprocess_cfg; the size always follows the tower.
_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode", "fill_color")


class OpenClipImageProcessor(MediaProcessor):
    """open_clip's validation transform applied to one image: PIL image -> ``[C, H, W]`` float32.

    Args:
        transform: the transform from ``open_clip.transform.image_transform_v2`` (picklable).
    """

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, raw: Any) -> torch.Tensor:
        return self.transform(raw).float()  # the transform converts to RGB itself


class OpenClipEncoder(Encoder):
    """The vision tower of an open_clip model; tokens of one intermediate layer.

    Args:
        arch: open_clip model name (``open_clip.list_models()``, e.g. "ViT-B-16", "RN50",
            "ViT-B-16-SigLIP"); with ``model_cfg`` it is only a label.
        weights: local weight file of the full open_clip model (its ``visual.`` tensors are taken)
            or of the vision tower alone; ``.safetensors`` or a PyTorch file read with
            ``weights_only=True``; may be a ``pkg:`` path. None keeps the random initialisation.
        model_cfg: full open_clip model config ``{"embed_dim", "vision_cfg", "text_cfg", ...}`` for
            architectures open_clip does not list (only ``embed_dim``, ``vision_cfg`` and
            ``quick_gelu`` are used). None looks ``arch`` up in open_clip's built-in configs.
        feature_layer: which intermediate output, as ``forward_intermediates`` numbers them: ViT
            blocks, or ModifiedResNet's (stem, layer1, ..., layer4); -1 (default) is the last.
        drop_cls: drop the class (prefix) tokens of ViT towers; towers without any ignore it.
        pretrained_tag: open_clip pretrained tag the weights came from (e.g. "webli" for SigLIP);
            only its preprocessing (mean, std, interpolation, resize mode) is read, nothing is
            downloaded.
        preprocess_cfg: preprocessing overrides (keys mean, std, interpolation, resize_mode,
            fill_color), applied over open_clip's defaults and the tag's; the size follows the tower.

    Raises:
        FileNotFoundError: if ``weights`` does not exist.
        ValueError: on an unknown ``arch`` without ``model_cfg``, weights that do not fit the tower,
            an out-of-range ``feature_layer``, or an unknown preprocessing key.
    """

    def __init__(
        self,
        arch: str,
        weights: str | None = None,
        model_cfg: dict | None = None,
        feature_layer: int = -1,
        drop_cls: bool = True,
        pretrained_tag: str | None = None,
        preprocess_cfg: dict | None = None,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.model_cfg = _resolve_model_cfg(arch, model_cfg)
        self._feature_layer = feature_layer
        self._drop_cls = drop_cls

        # read the file first: a wrong path fails before a large tower is built
        state = _tower_state(load_state_dict_file(weights)) if weights is not None else None
        self.visual = _build_tower(self.model_cfg)
        if state is not None:
            _load_tower(self.visual, state, f"open_clip {arch}: {weights}")
        self.visual.eval()

        self._preprocess = _resolve_preprocess(arch, pretrained_tag, preprocess_cfg)
        self._token_shapes: dict[tuple[int, ...], tuple[int, int]] = {}
        self.output_dim = self._probe((3, *self.image_size))[1]

    @property
    def image_size(self) -> tuple[int, int]:
        """The tower's input height and width."""
        size = self.visual.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def feature_layer(self) -> int:
        return self._feature_layer

    @property
    def drop_cls(self) -> bool:
        return self._drop_cls

    def preprocessor(self) -> MediaProcessor:
        cfg = PreprocessCfg(**merge_preprocess_dict(PreprocessCfg(size=self.image_size), self._preprocess))
        return OpenClipImageProcessor(image_transform_v2(cfg, is_train=False))

    def forward(self, inputs: torch.Tensor) -> EncoderOutput:
        pixels = inputs.to(next(self.visual.parameters()).dtype)  # [B, C, H, W], e.g. bf16 when the tower is
        return EncoderOutput(features=self._tokens(self.visual, pixels))

    def _tokens(self, visual: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        prefix_count = _num_prefix_tokens(visual)
        keep_prefix = prefix_count > 0 and not self._drop_cls
        out = visual.forward_intermediates(
            inputs,
            indices=[self._feature_layer],
            stop_early=True,  # blocks after the chosen one are not run
            intermediates_only=True,
            output_fmt="NCHW",  # the one format every tower family supports
            output_extra_tokens=keep_prefix,
        )
        features = out["image_intermediates"][0].flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, H*W, C]
        if keep_prefix:
            features = torch.cat([out["image_intermediates_prefix"][0], features], dim=1)  # [B, P + H*W, C]
        return features

    def _probe(self, shape: tuple[int, ...]) -> tuple[int, int]:
        # (N, D) for one input of `shape`, from a meta-device copy: exact for every tower family
        # and layer, with no memory or compute and without touching the live weights.
        if shape not in self._token_shapes:
            with torch.device("meta"):
                twin = _build_tower(self.model_cfg).eval()
                try:
                    tokens = self._tokens(twin, torch.zeros(1, *shape))
                except (AssertionError, IndexError) as err:
                    raise ValueError(
                        f"open_clip {self.arch}: cannot take feature_layer={self._feature_layer} of a "
                        f"{type(twin).__name__} on input {shape}: {err}"
                    ) from err
            self._token_shapes[shape] = (tokens.shape[1], tokens.shape[2])
        return self._token_shapes[shape]

    def num_tokens(self, input_shape: Sequence[int]) -> int:
        return self._probe(tuple(int(s) for s in input_shape))[0]

    def spec(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "weights": None,
            "model_cfg": deepcopy(self.model_cfg),
            "feature_layer": self._feature_layer,
            "drop_cls": self._drop_cls,
            "pretrained_tag": None,
            "preprocess_cfg": dict(self._preprocess),
        }

    def block_classes(self) -> tuple[type[nn.Module], ...]:
        if isinstance(self.visual, VisionTransformer):
            return (type(self.visual.transformer.resblocks[0]),)
        if isinstance(self.visual, ModifiedResNet):
            return (type(self.visual.layer1[0]),)
        # a timm trunk: its repeated units under `blocks` (ViTs) or `stages` (ConvNeXt, ...)
        container = getattr(self.visual.trunk, "blocks", None) or getattr(self.visual.trunk, "stages", None)
        if not isinstance(container, (nn.Sequential, nn.ModuleList)):
            return ()
        return tuple(dict.fromkeys(type(unit) for unit in container))


def _resolve_model_cfg(arch: str, model_cfg: dict | None) -> dict:
    if model_cfg is not None:
        missing = {"embed_dim", "vision_cfg"} - set(model_cfg)
        if missing:
            raise ValueError(f"open_clip {arch}: model_cfg lacks {sorted(missing)}")
        return deepcopy(model_cfg)
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"open_clip: unknown architecture {arch!r}.{hint} Pass model_cfg for architectures open_clip does not list."
        )
    return cfg


def _build_tower(model_cfg: dict) -> nn.Module:
    vision_cfg = dict(model_cfg["vision_cfg"])
    if vision_cfg.get("timm_model_name"):
        vision_cfg["timm_model_pretrained"] = False  # never download: weights come from `weights`
    # cast_dtype None: fp32 parameters; mixed precision is the trainer's business
    return _build_vision_tower(model_cfg["embed_dim"], vision_cfg, quick_gelu=model_cfg.get("quick_gelu", False))


def _tower_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if all(key.startswith("module.") for key in state):  # saved from DistributedDataParallel
        state = {key[len("module.") :]: value for key, value in state.items()}
    if any(key.startswith("visual.") for key in state):  # a full model: keep the tower
        state = {key[len("visual.") :]: value for key, value in state.items() if key.startswith("visual.")}
    return state


def _load_tower(visual: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    expected = set(visual.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{source} does not fit the vision tower: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    visual.load_state_dict(state)  # shape mismatches raise here, naming the tensor
    logger.info("%s: loaded the vision tower", source)


def _resolve_preprocess(arch: str, pretrained_tag: str | None, overrides: dict | None) -> dict[str, Any]:
    defaults = asdict(PreprocessCfg())
    cfg = {key: defaults[key] for key in _PREPROCESS_KEYS}
    if pretrained_tag is not None:
        tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained_tag)
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(arch)
            raise ValueError(f"open_clip {arch}: unknown pretrained tag {pretrained_tag!r}; known: {tags}")
        cfg.update({key: tag_cfg[key] for key in _PREPROCESS_KEYS if key in tag_cfg})
    unknown = sorted(set(overrides or {}) - set(_PREPROCESS_KEYS))
    if unknown:
        raise ValueError(f"open_clip {arch}: unknown preprocess_cfg keys {unknown}; valid: {list(_PREPROCESS_KEYS)}")
    cfg.update(overrides or {})
    # JSON-friendly: tuples become lists, so spec() survives a round trip through the saved config
    return {key: list(value) if isinstance(value, tuple) else value for key, value in cfg.items()}


def _num_prefix_tokens(visual: nn.Module) -> int:
    if isinstance(visual, VisionTransformer):
        return 1  # open_clip's ViT always has exactly one class token
    if isinstance(visual, TimmModel):
        return int(getattr(visual.trunk, "num_prefix_tokens", 0))
    return 0
