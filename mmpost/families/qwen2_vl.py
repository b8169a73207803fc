"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration``) in
and out of mmpost.

Import: the vision tower (without its merger) becomes a ``qwen2_vl`` encoder with the checkpoint's image
processor (dynamic resolution), the patch merger a ``patch_merger`` connector, and the text model a causal LM
(``mmpost.families.qwen2_vl_text``) whose positions are the LMM's ``mrope`` scheme. An image is written as
``<|vision_start|><|image_pad|><|vision_end|>`` and its ``<|image_pad|>`` expanded to its merged patches, as
the processor does.

Export: the same three parts (a tower and merger of one version, that version's text model) re-assemble into
the class they came from; the processor is the checkpoint's image processor with the model's tokenizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mmpost.families.base import (
    Family,
    assemble,
    causal_lm,
    chat_template_of,
    llm_state,
    load_released,
    one_medium,
    one_medium_lmm,
    processor_template,
    prompt_text,
    rename_llm,
    save_weights,
)
from mmpost.interfaces import MediaText

if TYPE_CHECKING:
    from mmpost.export.check import Probe
    from mmpost.model.lmm import LMM

DECODER = "model.language_model."
MEDIA_MODULES = ("visual",)
# version -> (transformers class, config class, text causal LM class name, merger norm)
_VERSIONS = {
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLConfig", "Qwen2VLTextForCausalLM", "layer"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig", "Qwen2_5_VLTextForCausalLM", "rms"),
}
_BY_CLASS = {names[0]: version for version, names in _VERSIONS.items()}


class Qwen2VL(Family):
    name = "qwen2_vl"
    architectures = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")

    def load(self, directory: Path, architecture: str) -> LMM:
        import transformers
        from transformers import AutoProcessor

        from mmpost.connectors.patch_merger import PatchMergerConnector
        from mmpost.encoders.qwen2_vl_vision import QwenVisionEncoder
        from mmpost.families.mrope import MRope

        version = _BY_CLASS[architecture]
        hf = load_released(getattr(transformers, architecture), directory)
        config = hf.config
        processor = AutoProcessor.from_pretrained(directory)
        visual = hf.model.visual
        merger = visual.merger
        encoder = QwenVisionEncoder.from_tower(visual, processor.image_processor)
        connector = PatchMergerConnector(merge_size=encoder.merge_size, norm=_VERSIONS[version][3])
        with torch.device("meta"):
            connector.build(encoder.output_dim, config.text_config.hidden_size)
        connector.merger = merger
        llm = causal_lm(config.text_config, hf.model.language_model, hf.lm_head)
        tokenizer = processor.tokenizer
        template, typed = chat_template_of(directory, tokenizer)
        tokenizer.chat_template = template
        token = tokenizer.convert_ids_to_tokens(config.image_token_id)
        start, end = (
            tokenizer.convert_ids_to_tokens(config.vision_start_token_id),
            tokenizer.convert_ids_to_tokens(config.vision_end_token_id),
        )
        return one_medium_lmm(
            directory,
            llm,
            "image",
            (encoder, connector),
            tokenizer,
            MediaText(start + token + end, token),
            config.image_token_id,
            positions=MRope(encoder.merge_size),
            typed_chat=typed,
        )

    def why_not(self, model: LMM) -> str | None:
        from mmpost.connectors.patch_merger import PatchMergerConnector
        from mmpost.encoders.qwen2_vl_vision import QwenVisionEncoder
        from mmpost.families.mrope import MRope

        parts = one_medium(model, "image")
        if isinstance(parts, str):
            return parts
        encoder, connector = parts
        if not isinstance(encoder, QwenVisionEncoder):
            return f"a Qwen2-VL vision tower (qwen2_vl); the image encoder is {type(encoder).__name__}"
        version = encoder.family
        norm = _VERSIONS[version][3]
        if not isinstance(connector, PatchMergerConnector) or connector.norm != norm:
            return f"its patch_merger (norm {norm}) connector; the image connector is {type(connector).__name__}"
        text_class = _VERSIONS[version][2]
        if type(model.base_llm).__name__ != text_class:
            return f"its own text model ({text_class}, M-RoPE); the LLM is {type(model.base_llm).__name__}"
        if not isinstance(model.positions, MRope):
            return "the mrope position scheme"
        return None

    def export(self, model: LMM, out: Path) -> None:
        import transformers
        from transformers import Qwen2VLProcessor

        encoder, connector = model.encoders["image"], model.connectors["image"]
        class_name, config_name, _, _ = _VERSIONS[encoder.family]
        tokenizer = model.tokenizer
        vision = encoder.tower.config.to_dict()
        width_key = "out_hidden_size" if encoder.family == "qwen2_5_vl" else "hidden_size"
        vision[width_key] = model.hidden_size
        text = model.base_llm.config.to_dict()
        config = getattr(transformers, config_name)(
            vision_config=vision,
            text_config=text,
            image_token_id=model.placeholder_ids["image"],
            video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
            tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
        )
        state = {f"model.visual.{k}": v for k, v in encoder.tower.state_dict().items()}
        state |= {f"model.visual.merger.{k}": v for k, v in connector.merger.state_dict().items()}
        hf = assemble(getattr(transformers, class_name), config, state | llm_state(model, DECODER), model)
        own = model.base_llm.base_model_prefix + "."
        save_weights(hf, out, model, lambda name: rename_llm(name, own, DECODER), MEDIA_MODULES)
        Qwen2VLProcessor(
            image_processor=encoder.image_processor(),
            tokenizer=tokenizer,
            video_processor=_video_processor(encoder),
            chat_template=processor_template(model),
        ).save_pretrained(out)

    def processor_inputs(self, processor: Any, model: LMM, probe: Probe) -> dict[str, torch.Tensor]:
        text = prompt_text(processor, model, probe, "image")
        return dict(processor(images=[probe.image], text=[text], return_tensors="pt"))

    def media_difference(self, inputs: Mapping[str, torch.Tensor], probe: Probe) -> float:
        ours = probe.batch.media["image"]
        if not torch.equal(inputs["image_grid_thw"], ours["grid_thw"]):
            return float("inf")
        return float((inputs["pixel_values"] - ours["pixel_values"]).abs().max())


def _video_processor(encoder: Any) -> Any:
    """Qwen2-VL's processor needs a video processor; one with the tower's patch sizes (mmpost reads no video)."""
    from transformers import Qwen2VLVideoProcessor

    config = encoder.tower.config
    return Qwen2VLVideoProcessor(
        patch_size=config.patch_size,
        temporal_patch_size=config.temporal_patch_size,
        merge_size=config.spatial_merge_size,
    )
