"""LLaVA (``LlavaForConditionalGeneration``, the LLaVA-1.5-hf layout) in and out of mmpost.

Import: the CLIP / SigLIP tower becomes an ``hf_vision`` encoder with the checkpoint's feature layer and
select strategy ("default" drops CLIP's CLS token), the projector a 2-layer ``mlp`` (GELU) or, for a
projector without an activation, the one ``linear`` map it computes, and the language model a transformers
causal LM with the checkpoint's tokenizer and the processor's chat template.

Export: the layout holds models whose only modality is ``image``, encoded by an ``hf_vision`` tower and
connected by a projection: ``mlp`` with depth 2 maps one to one onto ``multi_modal_projector`` (linear_1,
GELU, linear_2); ``linear`` (or ``mlp`` depth 1) becomes linear_1 followed by an identity activation and an
identity linear_2, which computes the same function. LoRA adapters are merged. A quantized LLM is written
in the compressed-tensors format with the vision tower and projector kept in float, and
``AutoModelForImageTextToText`` loads it as it is. The processor's chat template reads transformers' typed
content (``[{"type": "image"}, {"type": "text", ...}]``) as transformers' own LLaVA processors do.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmpost.families.base import (
    CheckpointError,
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
MEDIA_MODULES = ("vision_tower", "multi_modal_projector")


class Llava(Family):
    name = "llava"
    architectures = ("LlavaForConditionalGeneration",)

    def load(self, directory: Path, architecture: str) -> LMM:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        from mmpost.encoders.hf_vision import HFVisionEncoder

        hf = load_released(LlavaForConditionalGeneration, directory)
        config = hf.config
        layer = config.vision_feature_layer
        if not isinstance(layer, int):
            raise CheckpointError(
                f"{directory}: vision_feature_layer {layer} concatenates several layers; mmpost's hf_vision reads one"
            )
        strategy = config.vision_feature_select_strategy
        tower = hf.model.vision_tower
        if strategy == "default" and tower.config.model_type != "clip_vision_model":
            raise CheckpointError(
                f"{directory}: the 'default' select strategy drops the first token of a {tower.config.model_type} "
                "tower, which has no CLS token; mmpost keeps every patch of SigLIP towers"
            )
        processor = AutoProcessor.from_pretrained(directory)
        encoder = HFVisionEncoder.from_tower(tower, layer, strategy == "default", processor.image_processor)
        connector = projector_connector(hf.model.multi_modal_projector, config, encoder.output_dim)
        llm = causal_lm(config.text_config, hf.model.language_model, hf.lm_head)
        tokenizer = processor.tokenizer
        template, typed = chat_template_of(directory, tokenizer)
        tokenizer.chat_template = template
        token = tokenizer.convert_ids_to_tokens(config.image_token_id)
        return one_medium_lmm(
            directory,
            llm,
            "image",
            (encoder, connector),
            tokenizer,
            MediaText(token, token),
            config.image_token_id,
            typed_chat=typed,
        )

    def why_not(self, model: LMM) -> str | None:
        from mmpost.connectors.projection import MLPConnector
        from mmpost.encoders.hf_vision import HFVisionEncoder

        parts = one_medium(model, "image")
        if isinstance(parts, str):
            return parts
        encoder, connector = parts
        if not isinstance(encoder, HFVisionEncoder):
            return f"a transformers CLIP / SigLIP tower (hf_vision); the image encoder is {type(encoder).__name__}"
        if not isinstance(connector, MLPConnector) or connector.depth > 2:
            depth = f" of depth {connector.depth}" if isinstance(connector, MLPConnector) else ""
            return f"a linear or 2-layer mlp connector; the image connector is {type(connector).__name__}{depth}"
        if model.positions is not None:
            return "an LLM with 1-D positions; this one uses its own position scheme"
        return None

    def export(self, model: LMM, out: Path) -> None:
        from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

        encoder, connector = model.encoders["image"], model.connectors["image"]
        llm_config = model.base_llm.config
        config = LlavaConfig(
            vision_config=encoder.model.config.to_dict(),
            text_config=llm_config.to_dict(),
            image_token_id=model.placeholder_ids["image"],
            projector_hidden_act="gelu" if connector.depth == 2 else "linear",
            vision_feature_layer=encoder.feature_layer,
            vision_feature_select_strategy="default" if encoder.drop_cls else "full",
            multimodal_projector_bias=connector.bias,
            tie_word_embeddings=bool(getattr(llm_config, "tie_word_embeddings", False)),
        )
        hf = assemble(LlavaForConditionalGeneration, config, llava_state_dict(model), model)
        own = model.base_llm.base_model_prefix + "."
        save_weights(hf, out, model, lambda name: rename_llm(name, own, DECODER), MEDIA_MODULES)
        LlavaProcessor(
            image_processor=encoder.image_processor(),
            tokenizer=model.tokenizer,
            patch_size=encoder.model.config.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            chat_template=processor_template(model),
            image_token=model.media_text["image"].token,
            num_additional_image_tokens=1 if encoder.model_type == "clip" else 0,
        ).save_pretrained(out)

    def processor_inputs(self, processor: Any, model: LMM, probe: Probe) -> dict[str, torch.Tensor]:
        text = prompt_text(processor, model, probe, "image")
        return dict(processor(images=[probe.image], text=[text], return_tensors="pt"))

    def media_difference(self, inputs: Mapping[str, torch.Tensor], probe: Probe) -> float:
        return float((inputs["pixel_values"] - probe.batch.media["image"]).abs().max())


def projector_connector(projector: nn.Module, config: Any, in_dim: int):
    """The mmpost connector computing LLaVA's ``multi_modal_projector``: ``mlp`` depth 2 for GELU, or the single
    ``linear`` map ``linear_2 @ linear_1`` of a projector without an activation."""
    from mmpost.connectors.projection import LinearConnector, MLPConnector

    act, bias = config.projector_hidden_act, bool(config.multimodal_projector_bias)
    first, second = projector.linear_1, projector.linear_2
    width = second.out_features
    if act == "gelu":
        connector = MLPConnector(depth=2, bias=bias)
        connector.build(in_dim, width)
        connector.layers.load_state_dict(
            {f"0.{k}": v for k, v in first.state_dict().items()} | {f"2.{k}": v for k, v in second.state_dict().items()}
        )
        return connector
    if act == "linear":
        connector = LinearConnector(bias=bias)
        connector.build(in_dim, width)
        with torch.no_grad():
            connector.layers[0].weight.copy_(second.weight @ first.weight)
            if bias:
                connector.layers[0].bias.copy_(second.weight @ first.bias + second.bias)
        return connector
    raise CheckpointError(f"projector_hidden_act {act!r}: mmpost's projection connectors use gelu (or none)")


def llava_state_dict(model: LMM) -> dict[str, torch.Tensor]:
    """mmpost weights under ``LlavaForConditionalGeneration``'s parameter names (LoRA merged)."""
    encoder, connector = model.encoders["image"], model.connectors["image"]
    state = {f"model.vision_tower.{k}": v for k, v in encoder.model.state_dict().items()}
    layers, prefix = connector.layers, "model.multi_modal_projector."
    state[prefix + "linear_1.weight"] = layers[0].weight
    if connector.bias:
        state[prefix + "linear_1.bias"] = layers[0].bias
    if connector.depth == 2:
        state[prefix + "linear_2.weight"] = layers[2].weight
        if connector.bias:
            state[prefix + "linear_2.bias"] = layers[2].bias
    else:  # identity second layer: LLaVA's projector always has two
        width, dtype = model.hidden_size, layers[0].weight.dtype
        state[prefix + "linear_2.weight"] = torch.eye(width, dtype=dtype)
        if connector.bias:
            state[prefix + "linear_2.bias"] = torch.zeros(width, dtype=dtype)
    return state | llm_state(model, DECODER)
