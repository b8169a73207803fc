"""Export to transformers' ``LlavaForConditionalGeneration`` layout, which transformers, vLLM and
SGLang load with their own classes.

The layout fits models whose only modality is ``image``, encoded by a transformers CLIP / SigLIP
tower (``hf_vision``) and connected by a projection: ``mlp`` with depth 2 maps one to one onto
LLaVA's ``multi_modal_projector`` (linear_1, GELU, linear_2); ``linear`` (or ``mlp`` depth 1)
becomes linear_1 followed by an identity activation and an identity linear_2, which computes the
same function. LoRA adapters are merged. A quantized LLM is written in the compressed-tensors format with
the vision tower and projector kept in float, and ``AutoModelForImageTextToText`` loads it as it is.

The processor's chat template is the LLM's, behind a prologue that turns transformers' typed content
(``[{"type": "image"}, {"type": "text", "text": ...}]``) into the string content the LLM's template
concatenates, so the processor takes both forms as transformers' own LLaVA processors do.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from mmpost.interfaces import PLACEHOLDERS
from mmpost.model.format import base_llm_state_dict
from mmpost.model.lmm import LMM


class ExportError(ValueError):
    """A model whose parts the requested export format cannot express."""


def check_llava_compatible(model: LMM) -> None:
    """Raises ExportError naming the part that LLaVA's layout cannot hold."""
    from mmpost.connectors.projection import MLPConnector
    from mmpost.encoders.hf_vision import HFVisionEncoder

    if model.modalities != ["image"]:
        raise ExportError(f"--format hf holds exactly one image modality; this model has {model.modalities}")
    encoder, connector = model.encoders["image"], model.connectors["image"]
    if not isinstance(encoder, HFVisionEncoder):
        raise ExportError(
            f"--format hf needs a transformers CLIP / SigLIP tower (hf_vision); the image encoder is "
            f"{type(encoder).__name__}. Use --format mmpost"
        )
    if not isinstance(connector, MLPConnector) or connector.depth > 2:
        depth = f" of depth {connector.depth}" if isinstance(connector, MLPConnector) else ""
        raise ExportError(
            f"--format hf needs a linear or 2-layer mlp connector (LLaVA's projector); the image connector is "
            f"{type(connector).__name__}{depth}. Use --format mmpost"
        )


def llava_state_dict(model: LMM) -> dict[str, torch.Tensor]:
    """mmpost weights under ``LlavaForConditionalGeneration``'s parameter names (LoRA merged)."""
    encoder, connector = model.encoders["image"], model.connectors["image"]
    state: dict[str, torch.Tensor] = {}
    for key, value in encoder.model.state_dict().items():
        state[f"model.vision_tower.{key}"] = value
    layers = connector.layers
    state["model.multi_modal_projector.linear_1.weight"] = layers[0].weight
    if connector.bias:
        state["model.multi_modal_projector.linear_1.bias"] = layers[0].bias
    if connector.depth == 2:
        state["model.multi_modal_projector.linear_2.weight"] = layers[2].weight
        if connector.bias:
            state["model.multi_modal_projector.linear_2.bias"] = layers[2].bias
    else:  # identity second layer: LLaVA's projector always has two
        width = model.hidden_size
        state["model.multi_modal_projector.linear_2.weight"] = torch.eye(width, dtype=layers[0].weight.dtype)
        if connector.bias:
            state["model.multi_modal_projector.linear_2.bias"] = torch.zeros(width, dtype=layers[0].weight.dtype)
    for key, value in base_llm_state_dict(model, merge_lora=True).items():
        state[llava_name(model, key)] = value
    return state


def llava_name(model: LMM, name: str) -> str:
    """The LLaVA name of an LLM parameter or module: the decoder moves under ``model.language_model``."""
    decoder_prefix = model.base_llm.base_model_prefix + "."  # "model." for Llama / Qwen2
    if name.startswith(decoder_prefix):
        return "model.language_model." + name[len(decoder_prefix) :]
    return name  # lm_head.*


def typed_content_template(template: str, placeholders: Mapping[str, str]) -> str:
    """``template`` behind a prologue that rewrites typed message content into string content.

    A message whose content is a list of parts becomes the same message with string content: a part of a
    type in ``placeholders`` becomes its placeholder and a newline (``<image>\\n``, as mmpost's data writes
    ``<image>\\nQuestion``), a ``text`` part its text; any other part type fails. String content passes as
    it is, and a message keeps its other keys. transformers renders templates in an immutable sandbox, so
    the prologue builds a new list by concatenation rather than changing ``messages``.

    Args:
        template: a Jinja chat template that concatenates ``message['content']`` as a string.
        placeholders: part type -> the placeholder text that stands for it (``{"image": "<image>"}``).

    Returns:
        The prologue followed by ``template``, which renders string content exactly as ``template`` does.
    """
    literal = json.dumps(dict(placeholders))  # a JSON object of strings is also a Jinja dict literal
    # the newline after the last tag is the one trim_blocks drops, so the original template starts on a
    # fresh line with the whitespace control it had on its own
    prologue = (
        "{%- set typed_content = namespace(messages=[], text='', placeholders=" + literal + ") -%}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is defined and message['content'] is sequence"
        " and message['content'] is not string -%}"
        "{%- set typed_content.text = '' -%}"
        "{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'text' -%}"
        "{%- set typed_content.text = typed_content.text ~ part['text'] -%}"
        "{%- elif part['type'] in typed_content.placeholders -%}"
        "{%- set typed_content.text = typed_content.text ~ typed_content.placeholders[part['type']] ~ '\\n' -%}"
        "{%- else -%}"
        "{{- raise_exception('this model takes only text and ' ~ (typed_content.placeholders | list | join(', '))"
        " ~ ' content, not ' ~ part['type']) -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set typed_content.messages = typed_content.messages + [dict(message, content=typed_content.text)] -%}"
        "{%- else -%}"
        "{%- set typed_content.messages = typed_content.messages + [message] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set messages = typed_content.messages %}\n"
    )
    return prologue + template


def export_llava(model: LMM, out: Path) -> Path:
    """Writes ``out`` as a ``LlavaForConditionalGeneration`` directory with its ``LlavaProcessor``."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    check_llava_compatible(model)
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
    with torch.device("meta"):
        hf = LlavaForConditionalGeneration(config)
    state = {k: v.detach().clone() for k, v in llava_state_dict(model).items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ExportError(f"weights do not map onto LLaVA's layout: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        hf.tie_weights()
    hf.generation_config = model.base_llm.generation_config
    if model.quantization is None:
        hf.save_pretrained(out)
    else:
        from mmpost.model.quantized import save_compressed

        save_compressed(
            hf,
            out,
            model.quantization,
            rename=lambda name: llava_name(model, name),
            extra_ignore=["vision_tower", "multi_modal_projector"],
        )
    template = model.tokenizer.chat_template
    placeholders = {"image": PLACEHOLDERS["image"]}
    if isinstance(template, dict):  # named templates (default, tool_use, ...)
        template = {name: typed_content_template(text, placeholders) for name, text in template.items()}
    elif template is not None:
        template = typed_content_template(template, placeholders)
    processor = LlavaProcessor(
        image_processor=encoder.image_processor(),
        tokenizer=model.tokenizer,
        patch_size=encoder.model.config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=template,
        image_token=PLACEHOLDERS["image"],
        num_additional_image_tokens=1 if encoder.model_type == "clip" else 0,
    )
    processor.save_pretrained(out)
    return out
