"""Qwen2-Audio (``Qwen2AudioForConditionalGeneration``) in and out of mmpost.

Import: the Whisper-style audio tower (without its pooling and final layer norm) becomes a ``qwen2_audio``
encoder with the checkpoint's ``WhisperFeatureExtractor`` (every clip padded, or cut, to 30 s), the pooling,
layer norm and ``multi_modal_projector`` an ``audio_pooler`` connector, and the language model a transformers
causal LM. A clip is written ``<|audio_bos|><|AUDIO|><|audio_eos|>`` and its ``<|AUDIO|>`` expanded to the
clip's tokens, as ``Qwen2AudioProcessor`` does; the processor's chat template (typed content, ``{"type":
"audio"}``) renders the text. ``Qwen2AudioForConditionalGeneration`` never ties its LM head to the embeddings,
whatever its text config says, so the imported LLM keeps them apart too.

Export: the same three parts re-assemble into ``Qwen2AudioForConditionalGeneration`` (its LM head written as
its own tensor) with a ``Qwen2AudioProcessor`` of the encoder's feature extractor and the model's tokenizer;
``AutoModelForMultimodalLM`` loads it. LoRA adapters are merged; a quantized LLM is written in the
compressed-tensors format with the audio tower and projector kept in float.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

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
MEDIA_MODULES = ("audio_tower", "multi_modal_projector")
_POOL = 2  # Qwen2AudioEncoder's AvgPool1d(2, stride=2)


class Qwen2Audio(Family):
    name = "qwen2_audio"
    architectures = ("Qwen2AudioForConditionalGeneration",)
    auto_class = "AutoModelForMultimodalLM"

    def load(self, directory: Path, architecture: str) -> LMM:
        from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration
        from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder

        from mmpost.connectors.audio_pooler import AudioPoolerConnector
        from mmpost.encoders.qwen2_audio_encoder import QwenAudioEncoder

        hf = load_released(Qwen2AudioForConditionalGeneration, directory)
        config = hf.config
        tower = hf.model.audio_tower
        if not isinstance(tower, Qwen2AudioEncoder):
            raise CheckpointError(
                f"{directory}: an audio tower of type {config.audio_config.model_type!r}; mmpost's qwen2_audio "
                "encoder reads Qwen2AudioEncoder (qwen2_audio_encoder)"
            )
        processor = AutoProcessor.from_pretrained(directory)
        norm = tower.layer_norm  # taken before the encoder replaces it: it belongs to the connector
        encoder = QwenAudioEncoder.from_tower(tower, processor.feature_extractor)
        connector = AudioPoolerConnector(pool=_POOL)
        with torch.device("meta"):
            connector.build(encoder.output_dim, config.text_config.hidden_size)
        connector.norm, connector.proj = norm, hf.model.multi_modal_projector.linear
        text_config = copy.deepcopy(config.text_config)
        text_config.tie_word_embeddings = False
        llm = causal_lm(text_config, hf.model.language_model, hf.lm_head)
        tokenizer = processor.tokenizer
        template, typed = chat_template_of(directory, tokenizer)
        tokenizer.chat_template = template
        token = tokenizer.convert_ids_to_tokens(config.audio_token_id)
        if token != processor.audio_token:
            raise CheckpointError(
                f"{directory}: the processor expands {processor.audio_token!r} but audio_token_index "
                f"{config.audio_token_id} is {token!r}"
            )
        text = processor.audio_bos_token + token + processor.audio_eos_token
        return one_medium_lmm(
            directory,
            llm,
            "audio",
            (encoder, connector),
            tokenizer,
            MediaText(text, token),
            config.audio_token_id,
            typed_chat=typed,
        )

    def why_not(self, model: LMM) -> str | None:
        from mmpost.connectors.audio_pooler import AudioPoolerConnector
        from mmpost.encoders.qwen2_audio_encoder import QwenAudioEncoder

        parts = one_medium(model, "audio")
        if isinstance(parts, str):
            return parts
        encoder, connector = parts
        if not isinstance(encoder, QwenAudioEncoder):
            return (
                f"a Qwen2-Audio audio tower (qwen2_audio, 30 s windows); the audio encoder is {type(encoder).__name__}"
            )
        if not isinstance(connector, AudioPoolerConnector) or connector.pool != _POOL:
            pool = f" with pool {connector.pool}" if isinstance(connector, AudioPoolerConnector) else ""
            return (
                f"an audio_pooler connector with pool {_POOL}; the audio connector is {type(connector).__name__}{pool}"
            )
        if model.positions is not None:
            return "an LLM with 1-D positions; this one uses its own position scheme"
        return None

    def export(self, model: LMM, out: Path) -> None:
        from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor

        encoder = model.encoders["audio"]
        text = model.base_llm.config.to_dict() | {"tie_word_embeddings": False}  # the class never ties its head
        config = Qwen2AudioConfig(
            audio_config=encoder.tower.config.to_dict(),
            text_config=text,
            audio_token_index=model.placeholder_ids["audio"],
        )
        hf = assemble(Qwen2AudioForConditionalGeneration, config, qwen2_audio_state_dict(model), model)
        own = model.base_llm.base_model_prefix + "."
        save_weights(hf, out, model, lambda name: rename_llm(name, own, DECODER), MEDIA_MODULES)
        media = model.media_text["audio"]
        bos, _, eos = media.text.partition(media.token)
        Qwen2AudioProcessor(
            feature_extractor=encoder.feature_extractor(),
            tokenizer=model.tokenizer,
            chat_template=processor_template(model),
            audio_token=media.token,
            audio_bos_token=bos,
            audio_eos_token=eos,
        ).save_pretrained(out)

    def processor_inputs(self, processor: Any, model: LMM, probe: Probe) -> dict[str, torch.Tensor]:
        text = prompt_text(processor, model, probe, "audio")
        audio = probe.audio
        return dict(
            processor(text=[text], audio=[audio.waveform.numpy()], sampling_rate=audio.rate, return_tensors="pt")
        )

    def media_difference(self, inputs: Mapping[str, torch.Tensor], probe: Probe) -> float:
        ours = probe.batch.media["audio"]
        if not torch.equal(inputs["feature_attention_mask"].long(), ours["feature_attention_mask"]):
            return float("inf")
        return float((inputs["input_features"] - ours["input_features"]).abs().max())


def qwen2_audio_state_dict(model: LMM) -> dict[str, torch.Tensor]:
    """mmpost weights under ``Qwen2AudioForConditionalGeneration``'s parameter names (LoRA merged): the
    connector's norm is the tower's ``layer_norm``, its projection the projector's ``linear``."""
    encoder, connector = model.encoders["audio"], model.connectors["audio"]
    state = {f"model.audio_tower.{k}": v for k, v in encoder.tower.state_dict().items()}
    state |= {f"model.audio_tower.layer_norm.{k}": v for k, v in connector.norm.state_dict().items()}
    state |= {f"model.multi_modal_projector.linear.{k}": v for k, v in connector.proj.state_dict().items()}
    return state | llm_state(model, DECODER)
