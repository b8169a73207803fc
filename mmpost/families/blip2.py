"""BLIP-2 (``Blip2ForConditionalGeneration`` with a decoder-only language model: OPT, Llama, ...) and InstructBLIP
(``InstructBlipForConditionalGeneration``) in and out of mmpost.

Import: the vision tower becomes a ``blip_vision`` encoder (every token after the post-layernorm, what BLIP-2's
Q-Former reads) with the checkpoint's image processor; the Q-Former, its query tokens and the language projection
a ``qformer`` connector holding those modules; the language model, which BLIP-2 already holds as a transformers
causal LM, is the LMM's LLM as it is. A T5 (encoder-decoder) language model is refused.

Prompt layout: BLIP-2's processor writes ``num_query_tokens`` image tokens first and then the tokenizer's encoding
of the prompt, so a tokenizer that starts a text with BOS puts it after the image tokens (``<image>x32 </s>What
is it?``). Released checkpoints carry no chat template; mmpost renders conversations with ``chat_template``,
which writes

- the image of the first message as one image token (expanded to the query count, like any placeholder),
- the tokens the tokenizer puts before a text (BOS for OPT and Llama; none for a tokenizer without),
- each message's text as it is, later messages after a space, and each assistant reply closed by the EOS token;
  the generation prompt adds nothing.

A one-turn prompt ``<image>\\nQuestion: what is it? Answer:`` thus gives the ids of ``processor(images=image,
text="Question: what is it? Answer:")``, and a training reply is learnt as `` answer</s>``. Only the first message
may hold an image (the processor reads one per prompt); a template that the checkpoint's tokenizer may carry is
replaced. In a padded batch the processor pads between the image tokens and the text, mmpost pads whole rows: the
real tokens, in the same order and at the same positions, give the same logits.

Export: a model of a ``blip_vision`` encoder, a ``qformer`` connector without text input and a causal LM that
BLIP-2 accepts, rendered with this template, re-assembles into ``Blip2ForConditionalGeneration`` and a
``Blip2Processor`` (the encoder's image processor, the model's tokenizer without a chat template, since
transformers users call the processor with the plain prompt). LoRA adapters are merged; a quantized LLM is written
in the compressed-tensors format with the tower, Q-Former, query tokens and projection kept in float, and marked
to be dequantized while transformers loads it (``_dequantize_on_load`` says why).

InstructBLIP is taken apart and re-assembled the same way, its prompt laid out as BLIP-2's; its Q-Former also
reads the instruction (the text of the message holding the image, which ``InstructBlipProcessor`` takes from the
prompt it is given) in the Q-Former's own tokenizer: the tower becomes an ``instructblip_vision`` encoder holding
that tokenizer, the Q-Former an ``instruct_qformer`` connector, and an export writes an ``InstructBlipProcessor``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mmpost.families.base import (
    CheckpointError,
    Family,
    assemble,
    load_released,
    one_medium,
    one_medium_lmm,
    read_config,
    save_weights,
)
from mmpost.interfaces import MediaText

if TYPE_CHECKING:
    from mmpost.export.check import Probe
    from mmpost.model.lmm import LMM

LLM_PREFIX = "language_model."
MEDIA_MODULES = ("vision_model", "qformer", "query_tokens", "language_projection")


class Blip2(Family):
    name = "blip2"
    architectures = ("Blip2ForConditionalGeneration",)
    label = "BLIP-2"

    def parts(self) -> tuple[type, type]:
        """The encoder and connector classes of the family's tower and Q-Former."""
        from mmpost.connectors.qformer import QFormerConnector
        from mmpost.encoders.blip_vision import BlipVisionEncoder

        return BlipVisionEncoder, QFormerConnector

    def classes(self) -> tuple[type, type, type]:
        """The transformers model, config and processor classes."""
        from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

        return Blip2ForConditionalGeneration, Blip2Config, Blip2Processor

    def encoder_options(self, processor: Any) -> dict[str, Any]:
        """Constructor arguments of the encoder beside the tower, from the checkpoint's processor."""
        return {}

    def processor_parts(self, model: LMM) -> dict[str, Any]:
        """``processor`` constructor arguments beside the image processor and tokenizer."""
        return {}

    def load(self, directory: Path, architecture: str) -> LMM:
        from transformers import AutoProcessor

        _check_options(directory, read_config(directory))
        encoder_class, connector_class = self.parts()
        hf = load_released(self.classes()[0], directory)
        config = hf.config
        processor = AutoProcessor.from_pretrained(directory)
        if processor.num_query_tokens != config.num_query_tokens:
            raise CheckpointError(
                f"{directory}: the processor writes {processor.num_query_tokens} image tokens, the model has "
                f"{config.num_query_tokens} queries"
            )
        tokenizer = processor.tokenizer
        start = text_start(tokenizer)
        if start is None:
            raise CheckpointError(
                f"{directory}: the tokenizer adds tokens after a text; BLIP-2's layout (image tokens, then the "
                "tokenized prompt) has no place for them in a conversation"
            )
        token = tokenizer.convert_ids_to_tokens(config.image_token_id)
        tokenizer.chat_template = chat_template(token, start)
        options = self.encoder_options(processor)
        encoder = encoder_class.from_tower(hf.vision_model, processor.image_processor, **options)
        connector = connector_class.from_modules(hf.qformer, hf.query_tokens, hf.language_projection)
        return one_medium_lmm(
            directory,
            hf.language_model.eval(),
            "image",
            (encoder, connector),
            tokenizer,
            MediaText(token, token),
            config.image_token_id,
            typed_chat=True,
        )

    def why_not(self, model: LMM) -> str | None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        parts = one_medium(model, "image")
        if isinstance(parts, str):
            return parts
        encoder, connector = parts
        encoder_class, connector_class = self.parts()
        if type(encoder) is not encoder_class:
            return f"a {self.label} vision tower ({encoder_class.name}); the image encoder is {type(encoder).__name__}"
        if type(connector) is not connector_class or connector.config.get("use_qformer_text_input"):
            return (
                f"a {connector_class.name} connector (a Q-Former reading the image alone, no text input); the image "
                f"connector is {type(connector).__name__}"
            )
        model_type = model.base_llm.config.model_type
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            return f"a transformers causal LM; the LLM is a {model_type}"
        if model.positions is not None:
            return "an LLM with 1-D positions; this one uses its own position scheme"
        token = model.media_text["image"].token
        if token != "<image>":
            return f"the image written as <image> (Blip2Processor's token); this model writes {token}"
        start = text_start(model.tokenizer)
        if start is None or model.tokenizer.chat_template != chat_template(token, start) or not model.typed_chat:
            return (
                f"{self.label}'s prompt layout (image tokens, then the tokenized prompt: mmpost.families.blip2's "
                "template)"
            )
        return None

    def export(self, model: LMM, out: Path) -> None:
        from mmpost.model.format import base_llm_state_dict

        model_class, config_class, processor_class = self.classes()
        encoder, connector = model.encoders["image"], model.connectors["image"]
        config = config_class(
            vision_config=encoder.model.config.to_dict(),
            qformer_config=connector.qformer.config.to_dict(),
            text_config=model.base_llm.config.to_dict(),
            num_query_tokens=connector.num_queries,
            image_token_index=model.placeholder_ids["image"],
        )
        state = {f"vision_model.{k}": v for k, v in encoder.model.state_dict().items()}
        state |= {f"qformer.{k}": v for k, v in connector.qformer.state_dict().items()}
        state["query_tokens"] = connector.query_tokens
        state |= {f"language_projection.{k}": v for k, v in connector.proj.state_dict().items()}
        state |= {LLM_PREFIX + k: v for k, v in base_llm_state_dict(model, merge_lora=True).items()}
        hf = assemble(model_class, config, state, model)
        save_weights(hf, out, model, lambda name: LLM_PREFIX + name, MEDIA_MODULES)
        if model.quantization is not None:
            _dequantize_on_load(out)
        tokenizer = copy.deepcopy(model.tokenizer)  # the processor changes its tokenizer
        tokenizer.chat_template = None
        processor_class(
            image_processor=encoder.image_processor(),
            tokenizer=tokenizer,
            num_query_tokens=connector.num_queries,
            **self.processor_parts(model),
        ).save_pretrained(out)

    def processor_inputs(self, processor: Any, model: LMM, probe: Probe) -> dict[str, torch.Tensor]:
        return dict(processor(images=[probe.image], text=[probe.prompt], return_tensors="pt"))

    def media_difference(self, inputs: Mapping[str, torch.Tensor], probe: Probe) -> float:
        return float((inputs["pixel_values"] - probe.batch.media["image"]).abs().max())


class InstructBlip(Blip2):
    name = "instructblip"
    architectures = ("InstructBlipForConditionalGeneration",)
    label = "InstructBLIP"

    def parts(self) -> tuple[type, type]:
        from mmpost.connectors.instruct_qformer import InstructQFormerConnector
        from mmpost.encoders.blip_vision import InstructBlipVisionEncoder

        return InstructBlipVisionEncoder, InstructQFormerConnector

    def classes(self) -> tuple[type, type, type]:
        from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipProcessor

        return InstructBlipForConditionalGeneration, InstructBlipConfig, InstructBlipProcessor

    def encoder_options(self, processor: Any) -> dict[str, Any]:
        return {"tokenizer": processor.qformer_tokenizer}

    def processor_parts(self, model: LMM) -> dict[str, Any]:
        return {"qformer_tokenizer": copy.deepcopy(model.encoders["image"].tokenizer)}

    def media_difference(self, inputs: Mapping[str, torch.Tensor], probe: Probe) -> float:
        media = probe.batch.media["image"]
        ids, mask = inputs["qformer_input_ids"], inputs["qformer_attention_mask"]
        if ids.shape != media["instruction_ids"].shape or not torch.equal(ids, media["instruction_ids"]):
            return float("inf")  # the Q-Former would read another instruction
        if not torch.equal(mask.long(), media["instruction_mask"]):
            return float("inf")
        return float((inputs["pixel_values"] - media["pixel_values"]).abs().max())


def chat_template(image_token: str, start: str) -> str:
    """The chat template of the module docstring, for ``image_token`` and the text ``start`` (BOS) the tokenizer
    puts before a text; it reads transformers' typed content."""
    image, start = json.dumps(image_token), json.dumps(start)  # JSON strings are Jinja string literals
    return (
        "{%- for message in messages -%}"
        "{%- if loop.first -%}"
        "{%- for part in message['content'] if part['type'] == 'image' -%}{{- " + image + " -}}{%- endfor -%}"
        "{{- " + start + " -}}"
        "{%- else -%}"
        "{%- if message['content'] | selectattr('type', 'equalto', 'image') | list -%}"
        "{{- raise_exception('BLIP-2 reads an image in the first message only') -}}"
        "{%- endif -%}"
        "{{- ' ' -}}"
        "{%- endif -%}"
        "{%- for part in message['content'] if part['type'] == 'text' -%}{{- part['text'] -}}{%- endfor -%}"
        "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- endif -%}"
        "{%- endfor -%}"
    )


def text_start(tokenizer: Any) -> str | None:
    """The special tokens ``tokenizer`` puts before a text (``"</s>"`` for OPT, ``""`` for none), as text; None
    when it also adds tokens after one."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    added = len(full) - len(plain)
    if added < 0 or full[added:] != plain:
        return None
    return "".join(tokenizer.convert_ids_to_tokens(full[:added]))


def _check_options(directory: Path, config: Mapping[str, Any]) -> None:
    """Refuses, before loading any weights, what mmpost's parts do not compute."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    text_type = config.get("text_config", {}).get("model_type", "opt")
    if text_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise CheckpointError(
            f"{directory}: BLIP-2 with a {text_type} language model (encoder-decoder); mmpost's LLM is a causal LM "
            "(BLIP-2 with OPT, Llama, ...)"
        )
    if config.get("image_token_index") is None:
        raise CheckpointError(
            f"{directory}: no image_token_index; the checkpoint predates image tokens in BLIP-2's prompts, which "
            "mmpost's data pipeline needs (re-save it with a transformers processor that writes them)"
        )


def _dequantize_on_load(out: Path) -> None:
    """Has transformers dequantize the compressed LLM while loading (``quantization_config.dequantize``).

    compressed-tensors otherwise dequantizes on the first call of the top-level model, and BLIP-2's ``generate``
    never makes one (it calls its language model's ``generate``), so generation would meet packed weights. After
    loading, either way, transformers runs the dequantized weights; vLLM reads the other keys.
    """
    path = out / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["dequantize"] = True
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
