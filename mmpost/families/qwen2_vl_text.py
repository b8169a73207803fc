"""Qwen2-VL's and Qwen2.5-VL's text models as transformers causal LMs, so they stand alone as an mmpost LLM.

transformers has the text models (``Qwen2VLTextModel``: Qwen2 with multimodal rotary positions) only inside
the ``...ForConditionalGeneration`` classes. The causal LMs here add the LM head around them and take their
``forward`` from ``Qwen2ForCausalLM``, whose body only calls the decoder and the head; they are registered
with ``AutoModelForCausalLM`` when this module is imported, so a saved LLM reloads with ``from_pretrained``.
The decoder takes position ids ``[3, B, T]`` (temporal, height, width; ``mmpost.families.mrope``) or plain
``[B, T]`` ones, which it repeats for the three.
"""

from __future__ import annotations

from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, Qwen2ForCausalLM
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPreTrainedModel, Qwen2_5_VLTextModel
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLPreTrainedModel, Qwen2VLTextModel


class _WithHead:
    """The LM head around ``text_model_class`` (``lm_head`` beside ``model``, as in ``Qwen2ForCausalLM``)."""

    base_model_prefix = "model"
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    text_model_class: type[nn.Module]

    def __init__(self, config) -> None:
        super().__init__(config)
        self.model = self.text_model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    forward = Qwen2ForCausalLM.forward


class Qwen2VLTextForCausalLM(_WithHead, Qwen2VLPreTrainedModel, GenerationMixin):
    """Qwen2-VL's text model with its LM head."""

    config_class = Qwen2VLTextConfig
    config: Qwen2VLTextConfig
    text_model_class = Qwen2VLTextModel


class Qwen2_5_VLTextForCausalLM(_WithHead, Qwen2_5_VLPreTrainedModel, GenerationMixin):
    """Qwen2.5-VL's text model with its LM head."""

    config_class = Qwen2_5_VLTextConfig
    config: Qwen2_5_VLTextConfig
    text_model_class = Qwen2_5_VLTextModel


AutoModelForCausalLM.register(Qwen2VLTextConfig, Qwen2VLTextForCausalLM, exist_ok=True)
AutoModelForCausalLM.register(Qwen2_5_VLTextConfig, Qwen2_5_VLTextForCausalLM, exist_ok=True)
