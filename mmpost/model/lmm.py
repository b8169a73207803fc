"""The LMM: encoders and connectors per modality around a transformers causal LM.

Forward: embed the text, encode each medium, connect, scatter the media tokens into the placeholder
positions (one ``masked_scatter`` per modality), and run the LLM's decoder on ``inputs_embeds``.
During training logits are computed only at positions that have a label: full-vocabulary logits
over a whole multimodal sequence are the largest tensor of a step, and most positions are media or
prompt tokens.

The LLM is composed, never patched: mmpost calls ``get_input_embeddings()``, ``get_decoder()`` and
``get_output_embeddings()`` of the transformers model (through a peft wrapper when LoRA is on).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mmpost.config.schema import LLMConfig, LoraConfig
from mmpost.interfaces import (
    PLACEHOLDERS,
    Connector,
    Encoder,
    EncoderOutput,
    FusionConnector,
    MediaBatch,
    media_count,
)
from mmpost.losses.ce import cross_entropy_sum
from mmpost.model import fusion
from mmpost.model.fusion import FusionMedia, FusionState
from mmpost.model.llm import add_lora, base_causal_lm, has_lora, load_llm, prepare_tokenizer

IGNORE = -100


@dataclass
class LossOutput:
    """Summed token cross-entropy and the number of tokens it covers (normalised by the caller).

    Attributes:
        loss_sum: scalar, sum of per-token cross-entropy over label positions.
        num_tokens: number of label positions.
    """

    loss_sum: torch.Tensor
    num_tokens: int


def positions_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left- or right-padded batch: 0 at each sample's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _count_error(modality: str, placeholders: int, num_media: int, tokens: str) -> ValueError:
    return ValueError(
        f"{modality}: {placeholders} placeholder tokens in the batch but {num_media} media with {tokens}; "
        "the data pipeline must expand each placeholder to the connector's count"
    )


class LMM(nn.Module):
    """A large multimodal model made of swappable parts.

    Args:
        llm: a transformers causal-LM directory / hub id, or an already loaded ``PreTrainedModel``.
        encoders: per modality, an encoder (``mmpost.encoder(...)``).
        connectors: per modality, a connector (``mmpost.connector(...)``); built here for the
            encoder's width and the LLM's width.
        tokenizer: the LLM's tokenizer; loaded from ``llm`` when it is a path.
        lora: LoRA adapters to add to the LLM (``LoraConfig(r=16)``); None for none.
        llm_config: loading options when ``llm`` is a path (dtype, gguf_file, chat template).
    """

    def __init__(
        self,
        llm: str | PreTrainedModel,
        encoders: Mapping[str, Encoder] | None = None,
        connectors: Mapping[str, Connector] | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        lora: LoraConfig | None = None,
        llm_config: LLMConfig | None = None,
    ) -> None:
        super().__init__()
        if isinstance(llm, str):
            llm, loaded_tokenizer = load_llm(llm_config or LLMConfig(path=llm))
            tokenizer = tokenizer or loaded_tokenizer
        if tokenizer is None:
            raise ValueError("LMM: pass tokenizer= with a loaded LLM")
        self.tokenizer = tokenizer
        token_ids = prepare_tokenizer(llm, tokenizer, list(PLACEHOLDERS.values()))
        self.placeholder_ids = {modality: token_ids[token] for modality, token in PLACEHOLDERS.items()}
        self.llm = add_lora(llm, lora) if lora is not None and lora.r > 0 else llm
        self.lora_config = lora if lora is not None and lora.r > 0 else None
        self.encoders = nn.ModuleDict()
        self.connectors = nn.ModuleDict()
        self.fusion_state = FusionState()  # media for fusion connectors' blocks during a forward
        self._fusion_hooks: dict[str, list] = {}
        encoders, connectors = dict(encoders or {}), dict(connectors or {})
        if set(encoders) != set(connectors):
            raise ValueError(
                f"every modality needs an encoder and a connector: encoders {sorted(encoders)}, "
                f"connectors {sorted(connectors)}"
            )
        for modality in encoders:
            self.add_modality(modality, encoders[modality], connectors[modality])

    # ----------------------------------------------------------------- parts

    @property
    def hidden_size(self) -> int:
        return self.base_llm.get_input_embeddings().embedding_dim

    @property
    def base_llm(self) -> PreTrainedModel:
        """The transformers CausalLM (inside the peft wrapper when LoRA is on)."""
        return base_causal_lm(self.llm)

    @property
    def modalities(self) -> list[str]:
        return list(self.encoders)

    def add_modality(self, modality: str, encoder: Encoder, connector: Connector) -> None:
        """Adds a medium with its encoder and connector; the other parts keep their weights.

        Raises:
            ValueError: for a modality without a placeholder token or one already present.
        """
        if modality not in PLACEHOLDERS:
            raise ValueError(f"no placeholder token for modality {modality!r}; known: {sorted(PLACEHOLDERS)}")
        if modality in self.encoders:
            raise ValueError(f"modality {modality!r} exists; use set_encoder / set_connector to replace parts")
        self.encoders[modality] = encoder
        self.set_connector(modality, connector)

    def set_connector(self, modality: str, connector: Connector) -> None:
        """Replaces the connector of ``modality``, building it for the encoder and LLM widths.

        A fusion connector's blocks are hooked in front of its decoder layers, and the previous
        connector's blocks (if it was one) are unhooked; the LLM's own weights are not touched.
        """
        if modality not in self.encoders:
            raise ValueError(f"no encoder for modality {modality!r}; add it with add_modality")
        encoder = self.encoders[modality]
        ref = next(self.parameters(), None)
        layers = self.base_llm.get_decoder().layers
        if not connector.is_built:
            if isinstance(connector, FusionConnector):
                connector.build(encoder.output_dim, self.hidden_size, num_layers=len(layers))
            else:
                connector.build(encoder.output_dim, self.hidden_size)
        elif (connector.in_dim, connector.out_dim) != (encoder.output_dim, self.hidden_size):
            raise ValueError(
                f"connector for {modality!r} was built for {connector.in_dim} -> {connector.out_dim}, but the encoder "
                f"gives {encoder.output_dim} and the LLM takes {self.hidden_size}"
            )
        if ref is not None:
            connector.to(device=ref.device)
        for handle in self._fusion_hooks.pop(modality, []):
            handle.remove()
        if isinstance(connector, FusionConnector):
            self._fusion_hooks[modality] = fusion.install(layers, self.fusion_state, modality, connector)
        self.connectors[modality] = connector

    def set_encoder(self, modality: str, encoder: Encoder) -> None:
        """Replaces the encoder of ``modality``; the connector is rebuilt (fresh) only if widths change."""
        if modality not in self.encoders:
            raise ValueError(f"no encoder for modality {modality!r}; add it with add_modality")
        old = self.connectors[modality]
        self.encoders[modality] = encoder
        if old.in_dim != encoder.output_dim:
            fresh = type(old)(**old.spec())
            self.set_connector(modality, fresh)

    def media_tokens(self, modality: str, input_shape: tuple[int, ...]) -> int:
        """How many LLM tokens one preprocessed medium of ``input_shape`` becomes (1 marker for fusion)."""
        return self.connectors[modality].num_tokens(self.encoders[modality].num_tokens(input_shape))

    # ----------------------------------------------------------------- forward

    def features(self, modality: str, inputs: MediaBatch) -> EncoderOutput:
        """Encoder features of a collated batch of media (no gradient when the encoder is frozen)."""
        encoder = self.encoders[modality]
        frozen = not any(p.requires_grad for p in encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            return encoder(inputs)

    def embed(
        self,
        input_ids: torch.Tensor,
        media: Mapping[str, MediaBatch] | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, FusionMedia]]:
        """Text embeddings ``[B, T, D]`` with token connectors' media tokens in their placeholder
        positions, and the fusion connectors' media laid out per sample (for the blocks)."""
        embeds = self.llm.get_input_embeddings()(input_ids)  # [B, T, D]
        fused: dict[str, FusionMedia] = {}
        for modality, inputs in (media or {}).items():
            if inputs is None or media_count(inputs) == 0:
                continue
            connector = self.connectors[modality]
            out = self.features(modality, inputs)
            markers = input_ids == self.placeholder_ids[modality]  # [B, T]
            num_markers = int(markers.sum())
            if isinstance(connector, FusionConnector):
                values, mask = connector.media(out.features, out.mask)
                if num_markers != values.shape[0]:
                    raise _count_error(modality, num_markers, values.shape[0], "1 marker token each")
                if position_ids is None:
                    position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
                fused[modality] = fusion.layout_media(values, mask, markers, position_ids)
                continue
            tokens = connector(out.features, out.mask)  # [K, M, D]
            keep = connector.token_mask(out.mask)
            flat = tokens.reshape(-1, tokens.shape[-1]) if keep is None else tokens[keep]
            if num_markers != flat.shape[0]:
                raise _count_error(modality, num_markers, tokens.shape[0], f"{flat.shape[0]} tokens in all")
            embeds = embeds.masked_scatter(markers.unsqueeze(-1), flat.to(embeds.dtype))
        return embeds, fused

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        media: Mapping[str, MediaBatch] | None = None,
    ) -> torch.Tensor:
        """Last hidden states ``[B, T, D]`` of the LLM's decoder for a (right- or left-) padded batch."""
        position_ids = positions_of(attention_mask)
        embeds, fused = self.embed(input_ids, media, position_ids)
        decoder = self.base_llm.get_decoder()
        with self.fusion_state.active(fused, position_ids):
            out = decoder(
                inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            )
        return out.last_hidden_state

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Applies the LM head (and final logit softcapping where the model has it)."""
        logits = self.base_llm.get_output_embeddings()(hidden)
        cap = getattr(self.base_llm.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        media: Mapping[str, MediaBatch] | None = None,
        labels: torch.Tensor | None = None,
    ) -> LossOutput | torch.Tensor:
        """With ``labels`` (aligned with ``input_ids``, -100 where ignored): summed next-token CE over the
        label positions only. Without: full logits ``[B, T, V]``.
        """
        hidden = self.hidden_states(input_ids, attention_mask, media)
        if labels is None:
            return self.logits_from_hidden(hidden)
        targets = labels[:, 1:]  # position t predicts token t + 1
        keep = targets != IGNORE  # [B, T-1]
        logits = self.logits_from_hidden(hidden[:, :-1][keep])  # [N, V]
        loss_sum = cross_entropy_sum(logits, targets[keep])
        return LossOutput(loss_sum=loss_sum, num_tokens=int(keep.sum()))

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        media: Mapping[str, MediaBatch] | None = None,
        max_new_tokens: int = 32,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Continues left-padded prompts with the LLM's ``generate`` (KV cache on); returns new tokens only.

        ``generate_kwargs`` go to transformers' ``generate`` (``do_sample``, ``temperature``, ``top_p``...);
        decoding is greedy by default.
        """
        if attention_mask[:, -1].min() == 0:
            raise ValueError("generate() needs left-padded prompts (pad on the left, last column all real tokens)")
        position_ids = positions_of(attention_mask)  # what transformers' generate() computes too
        embeds, fused = self.embed(input_ids, media, position_ids)
        generate_kwargs.setdefault("do_sample", False)
        if self.base_llm.generation_config.eos_token_id is None:
            generate_kwargs.setdefault("eos_token_id", self.tokenizer.eos_token_id)
        with self.fusion_state.active(fused, position_ids):
            return self.llm.generate(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                **generate_kwargs,
            )

    # ----------------------------------------------------------------- save / load

    @property
    def has_lora(self) -> bool:
        return has_lora(self.llm)

    def save(self, path, merge_lora: bool = False) -> None:
        """Writes a self-describing directory (see ``mmpost.model.io``) that ``mmpost.load`` reads."""
        from mmpost.model.io import save_lmm

        save_lmm(self, path, merge_lora=merge_lora)
