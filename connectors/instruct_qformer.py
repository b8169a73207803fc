"""InstructBLIP's Q-Former: BLIP-2's, with the instruction's tokens read beside the queries.

The transformer is transformers' ``InstructBlipQFormerModel``: the instruction (tokenized by the Q-Former's own
tokenizer, passed by an ``instructblip_vision`` encoder as ``EncoderOutput.context``) is embedded with its word
and position embeddings and placed after the queries; queries and instruction attend to each other, the queries
alone cross-attend to the image, and the queries' outputs become the LLM tokens, as
``InstructBlipForConditionalGeneration.get_image_features`` computes them.
"""

from __future__ import annotations

import torch
from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel

from mmpost.connectors.qformer import QFormerConnector, own_fields
from mmpost.interfaces import EncoderOutput

_DEFAULTS = InstructBlipQFormerConfig().to_dict()


class InstructQFormerConnector(QFormerConnector):
    """InstructBLIP's Q-Former as a token connector; arguments as ``qformer``'s: ``config`` takes the
    ``InstructBlipQFormerConfig`` fields (``vocab_size`` and ``pad_token_id`` must be the Q-Former tokenizer's),
    ``path`` a saved InstructBLIP model (a released one is better imported whole, ``from: hf:PATH``).

    Raises:
        ValueError: as ``qformer``'s; and (in a forward) on features without instruction tokens.
    """

    name = "instruct_qformer"
    config_class = InstructBlipQFormerConfig
    model_class = InstructBlipQFormerModel
    defaults = _DEFAULTS
    config_keys = own_fields(_DEFAULTS)

    def connect(self, out: EncoderOutput) -> torch.Tensor:
        context = out.context or {}
        if "input_ids" not in context:
            raise ValueError(
                "instruct_qformer reads the instruction's tokens beside the image features; its encoder must pass "
                "them (instructblip_vision does)"
            )
        return self.proj(self.query_outputs(out.features, out.mask, context["input_ids"], context["attention_mask"]))

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.connect(EncoderOutput(features, mask))

    def query_outputs(
        self,
        features: torch.Tensor,
        mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The Q-Former's last hidden states for the queries, ``[K, num_queries, hidden_size]``, the instruction
        ``input_ids`` (``[K, L]``, padded on the right, ``attention_mask`` 0 at padding) read beside them."""
        queries = self.query_tokens.expand(features.shape[0], -1, -1)
        query_mask = torch.ones(queries.shape[:2], dtype=torch.long, device=features.device)
        out = self.qformer(
            input_ids=input_ids,
            attention_mask=torch.cat([query_mask, attention_mask.to(query_mask)], dim=1),
            query_embeds=queries,
            encoder_hidden_states=features,
            encoder_attention_mask=None if mask is None else mask.long(),
        )
        return out.last_hidden_state[:, : self.num_queries]
