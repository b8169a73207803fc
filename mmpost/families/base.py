"""What every released-model family shares: the ``Family`` contract, reading a checkpoint through its own
transformers class, and the pieces of an export (the LLM's weights under the family's names, a quantized
LLM in compressed-tensors with the media parts in float, the processor's chat template).

A checkpoint is read by the transformers class named in its ``config.json`` (``from_pretrained`` with its
key conversions, shards and dtypes), then taken apart: its modules move into mmpost's encoder, connector
and causal LM, sharing their tensors, so nothing is loaded twice.
"""

from __future__ import annotations

import copy
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

    from mmpost.model.lmm import LMM

log = logging.getLogger("mmpost")


class ExportError(ValueError):
    """A model whose parts the requested export format cannot express."""


class CheckpointError(ValueError):
    """A released checkpoint mmpost cannot take apart: an unsupported class, missing tensors, unsupported options."""


class Family(ABC):
    """One released model family: its transformers classes, how a checkpoint becomes mmpost parts, and back.

    ``probe`` arguments are the export check's probes (``mmpost.export.check.Probe``: a prompt, its raw media and
    mmpost's batch of them); that module imports this one, so they are typed loosely here.

    Attributes:
        name: the family's registry name (``llava``).
        architectures: the ``config.json`` architectures it reads.
        auto_class: the transformers Auto class that loads its exports.
    """

    name: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]]
    auto_class: ClassVar[str] = "AutoModelForImageTextToText"

    @abstractmethod
    def load(self, directory: Path, architecture: str) -> LMM:
        """The mmpost model of the checkpoint in ``directory`` (whose class is ``architecture``).

        Raises:
            CheckpointError: naming missing tensors or an option mmpost does not implement.
        """

    @abstractmethod
    def why_not(self, model: LMM) -> str | None:
        """None when ``model``'s parts fit this family's layout; else what does not fit."""

    @abstractmethod
    def export(self, model: LMM, out: Path) -> None:
        """Writes ``model`` (whose parts fit) to ``out`` as this family's transformers model and processor."""

    @abstractmethod
    def processor_inputs(self, processor: Any, model: LMM, probe: Any) -> dict[str, torch.Tensor]:
        """What the exported ``processor`` gives for ``probe`` (its text rendered as transformers users do)."""

    @abstractmethod
    def media_difference(self, inputs: Mapping[str, torch.Tensor], probe: Any) -> float:
        """Max |difference| between the processor's media tensors and mmpost's for the probe."""

    @property
    def class_names(self) -> str:
        return " / ".join(self.architectures)


def one_medium_lmm(
    directory: Path,
    llm: PreTrainedModel,
    modality: str,
    parts: tuple[nn.Module, nn.Module],
    tokenizer: Any,
    media_text: Any,
    token_id: int,
    **options: Any,
) -> LMM:
    """The LMM of a released model with one medium: its LLM, the ``(encoder, connector)`` ``parts`` of
    ``modality``, written as ``media_text``, with ``options`` (``typed_chat``, ``positions``) for the LMM.

    Raises:
        CheckpointError: when the tokenizer gives the placeholder another id than the checkpoint's ``token_id``.
    """
    from mmpost.model.lmm import LMM

    encoder, connector = parts
    model = LMM(
        llm,
        {modality: encoder},
        {modality: connector},
        tokenizer=tokenizer,
        media_text={modality: media_text},
        **options,
    )
    if model.placeholder_ids[modality] != token_id:
        raise CheckpointError(f"{directory}: {modality} token {media_text.token!r} is not id {token_id}")
    return model


def one_medium(model: LMM, modality: str) -> tuple[nn.Module, nn.Module] | str:
    """``model``'s encoder and connector when ``modality`` is its one medium, else the reason it is not."""
    if model.modalities != [modality]:
        return f"exactly one {modality} modality (this model has {model.modalities})"
    return model.encoders[modality], model.connectors[modality]


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json; expected a transformers save_pretrained directory")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{path} is not JSON ({err})") from None


def load_released(cls: type[PreTrainedModel], directory: Path) -> PreTrainedModel:
    """``cls.from_pretrained(directory)`` in float32, refusing a checkpoint that lacks tensors (named).

    transformers fills missing tensors with random values and only logs it; a released model missing its
    projector or a layer would then train and export silently wrong.
    """
    model, info = cls.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = sorted(k for k in info["missing_keys"] if k not in tied)
    if missing or info["mismatched_keys"]:
        shown = ", ".join(missing[:8]) + (", ..." if len(missing) > 8 else "")
        mismatched = [k[0] if isinstance(k, tuple) else k for k in info["mismatched_keys"]]
        raise CheckpointError(
            f"{directory} is not a complete {cls.__name__}: {len(missing)} tensors missing ({shown})"
            + (f"; shapes differ for {mismatched[:5]}" if mismatched else "")
        )
    return model.eval()


def causal_lm(text_config: PretrainedConfig, decoder: nn.Module, lm_head: nn.Module) -> PreTrainedModel:
    """The transformers causal LM of ``text_config`` holding ``decoder``'s and ``lm_head``'s tensors (shared).

    Raises:
        CheckpointError: when transformers has no causal-LM class for the text model.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(text_config)
    try:
        with torch.device("meta"):
            llm = AutoModelForCausalLM.from_config(config)
    except ValueError as err:
        raise CheckpointError(f"no transformers causal LM for the text model {config.model_type!r}: {err}") from None
    prefix = llm.base_model_prefix
    state = {f"{prefix}.{k}": v for k, v in decoder.state_dict().items()}
    state |= {f"lm_head.{k}": v for k, v in lm_head.state_dict().items()}
    llm.load_state_dict(state, strict=True, assign=True)
    for name, buffer in decoder.named_buffers():  # not in a state dict (rotary frequencies): shared as they are
        owner, _, attr = f"{prefix}.{name}".rpartition(".")
        llm.get_submodule(owner)._buffers[attr] = buffer
    llm.tie_weights()
    return llm.eval()


def llm_state(model: LMM, decoder_prefix: str) -> dict[str, torch.Tensor]:
    """The LLM's weights (LoRA merged) with the decoder under ``decoder_prefix`` (``model.language_model.``)."""
    from mmpost.model.format import base_llm_state_dict

    own = model.base_llm.base_model_prefix + "."
    return {rename_llm(k, own, decoder_prefix): v for k, v in base_llm_state_dict(model, merge_lora=True).items()}


def rename_llm(name: str, own_prefix: str, decoder_prefix: str) -> str:
    """An LLM parameter or module name under the family's layout: the decoder moves, ``lm_head`` stays."""
    return decoder_prefix + name[len(own_prefix) :] if name.startswith(own_prefix) else name


def assemble(
    hf_cls: type[PreTrainedModel], config: PretrainedConfig, state: dict[str, torch.Tensor], model: LMM
) -> PreTrainedModel:
    """A ``hf_cls`` model of ``config`` holding ``state`` (cloned), with the LM head tied as the config says.

    Raises:
        ExportError: naming tensors the layout expects but ``state`` lacks, or holds but the layout has not.
    """
    with torch.device("meta"):
        hf = hf_cls(config)
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    tied = bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
    if tied:
        state.pop("lm_head.weight", None)
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ExportError(
            f"weights do not map onto {hf_cls.__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if tied:
        hf.tie_weights()
    hf.generation_config = copy.deepcopy(model.base_llm.generation_config)
    # as mmpost's generate does: a media token in generated text would stand for media that do not exist
    suppressed = set(hf.generation_config.suppress_tokens or []) | set(model.placeholder_ids.values())
    hf.generation_config.suppress_tokens = sorted(suppressed)
    return hf.eval()


def save_weights(
    hf: PreTrainedModel, out: Path, model: LMM, rename: Callable[[str], str], media_modules: Iterable[str]
) -> None:
    """``save_pretrained``, or for a quantized LLM the compressed-tensors layout with ``media_modules`` (the
    tower and connector) kept in float; ``rename`` maps mmpost's LLM module names to ``hf``'s."""
    if model.quantization is None:
        hf.save_pretrained(out)
        return
    from mmpost.model.compressed import save_compressed

    save_compressed(hf, out, model.quantization, rename=rename, extra_ignore=list(media_modules))


def processor_template(model: LMM) -> str | dict[str, str] | None:
    """The chat template an exported processor carries: the model's own when it already reads typed content,
    else the model's behind a prologue that turns typed content into mmpost's string content."""
    from mmpost.interfaces import PLACEHOLDERS

    template = model.tokenizer.chat_template
    if template is None or model.typed_chat:
        return template
    placeholders = {m: model.media_text[m].text for m in model.modalities} or {"image": PLACEHOLDERS["image"]}
    if isinstance(template, dict):  # named templates (default, tool_use, ...)
        return {name: typed_content_template(text, placeholders) for name, text in template.items()}
    return typed_content_template(template, placeholders)


def typed_content_template(template: str, placeholders: Mapping[str, str]) -> str:
    """``template`` behind a prologue that rewrites typed message content into string content.

    A message whose content is a list of parts becomes the same message with string content: a part of a
    type in ``placeholders`` becomes its text and a newline (``<image>\\n``, as mmpost's data writes
    ``<image>\\nQuestion``), a ``text`` part its text; any other part type fails. String content passes as
    it is, and a message keeps its other keys. transformers renders templates in an immutable sandbox, so
    the prologue builds a new list by concatenation rather than changing ``messages``.

    Args:
        template: a Jinja chat template that concatenates ``message['content']`` as a string.
        placeholders: part type -> the text that stands for it (``{"image": "<image>"}``).

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


def prompt_text(processor: Any, model: LMM, probe: Any, modality: str) -> str:
    """The probe's prompt as a transformers user renders it: typed content through the processor's template
    (mmpost's string content through the tokenizer's when the processor has none)."""
    from mmpost.interfaces import PLACEHOLDERS

    reads = modality in model.modalities
    if getattr(processor, "chat_template", None):
        content = ([{"type": modality}] if reads else []) + [{"type": "text", "text": probe.prompt}]
        return processor.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    prefix = PLACEHOLDERS[modality] + "\n" if reads else ""
    return model.tokenizer.apply_chat_template(
        [{"role": "user", "content": prefix + probe.prompt}], tokenize=False, add_generation_prompt=True
    )


def chat_template_of(directory: Path, tokenizer: Any) -> tuple[str | None, bool]:
    """The template an imported model renders with, and whether it reads typed content.

    A released processor's own template (``chat_template.jinja`` / ``chat_template.json`` beside the weights)
    is what transformers users render with, and it reads typed content; without one, the tokenizer's.
    """
    jinja, js = directory / "chat_template.jinja", directory / "chat_template.json"
    if jinja.is_file():
        return jinja.read_text(), True
    if js.is_file():
        template = json.loads(js.read_text()).get("chat_template")
        if template:
            return template, True
    return getattr(tokenizer, "chat_template", None), False
