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

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mmpost.config.schema import LLMConfig, LoraConfig
from mmpost.interfaces import (
    IGNORE,
    PLACEHOLDERS,
    Connector,
    Encoder,
    EncoderOutput,
    FusionConnector,
    MediaBatch,
    MediaText,
    cached_output,
    default_media_text,
    media_count,
)
from mmpost.losses.ce import cross_entropy_sum
from mmpost.losses.chunked_ce import is_plain_head, linear_cross_entropy_sum
from mmpost.model import fusion
from mmpost.model.format import save_lmm
from mmpost.model.fusion import FusionMedia, FusionState
from mmpost.model.heads import head_values
from mmpost.model.llm import load_llm, prepare_tokenizer
from mmpost.model.lora import add_lora, base_causal_lm, has_lora
from mmpost.model.masks import packed_hidden
from mmpost.model.outputs import TokenLogits
from mmpost.model.positions import PositionScheme, positions_of
from mmpost.model.shared_prompt import shared_logits


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
        media_text: per modality, how the model writes a medium in its text (``MediaText``); by default its
            placeholder itself (``<image>``), added to the tokenizer as one special token.
        positions: how the decoder's position ids are computed (``PositionScheme``; Qwen2-VL's 3-D rotary
            positions from the image grids); None: 0, 1, 2, ... over the real tokens of each row.
        typed_chat: the tokenizer's chat template reads transformers' typed message content (a released
            processor's template), so the data's text is split into typed parts before rendering
            (``mmpost.data.chat.typed_parts``).
    """

    def __init__(
        self,
        llm: str | PreTrainedModel,
        encoders: Mapping[str, Encoder] | None = None,
        connectors: Mapping[str, Connector] | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        lora: LoraConfig | None = None,
        llm_config: LLMConfig | None = None,
        media_text: Mapping[str, MediaText] | None = None,
        positions: PositionScheme | None = None,
        typed_chat: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(llm, str):
            llm, loaded_tokenizer = load_llm(llm_config or LLMConfig(path=llm))
            tokenizer = tokenizer or loaded_tokenizer
        if tokenizer is None:
            raise ValueError("LMM: pass tokenizer= with a loaded LLM")
        self.tokenizer = tokenizer
        self.media_text: dict[str, MediaText] = {}
        self.placeholder_ids: dict[str, int] = {}
        self.llm = llm
        self._add_media_text(media_text if media_text is not None else default_media_text(PLACEHOLDERS))
        self.positions = positions
        self.typed_chat = typed_chat
        self.llm = add_lora(llm, lora) if lora is not None and lora.r > 0 else llm
        self.lora_config = lora if lora is not None and lora.r > 0 else None
        self.encoders = nn.ModuleDict()
        self.connectors = nn.ModuleDict()
        self.heads = nn.ModuleDict()  # scalar heads by name (``mmpost.model.heads``): a reward model's, PPO's value
        self.fusion_state = FusionState()  # media for fusion connectors' blocks during a forward
        self.quantization = None  # the LLM's scales once quantized (mmpost.model.quantized.QuantState)
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
        if modality not in self.media_text:  # a released model comes with its own media's tokens only
            self._add_media_text(default_media_text([modality]))
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

    def set_llm(self, llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        """Puts another LLM (with its tokenizer) under the encoders and connectors.

        Media are written as the new LLM's placeholders (``<image>``) with 1-D positions; a connector keeps
        its weights when it already gives the new LLM's width, else a fresh one of the same spec is built.
        LoRA adapters and quantization of the old LLM go with it.
        """
        self.tokenizer, self.llm = tokenizer, llm
        self.media_text, self.placeholder_ids = {}, {}
        self._add_media_text(default_media_text(PLACEHOLDERS))
        self.positions, self.typed_chat, self.quantization, self.lora_config = None, False, None, None
        for handle in (h for handles in self._fusion_hooks.values() for h in handles):
            handle.remove()
        self._fusion_hooks = {}
        for modality, old in list(self.connectors.items()):
            fits = old.out_dim == self.hidden_size and not isinstance(old, FusionConnector)
            self.set_connector(modality, old if fits else type(old)(**old.spec()))

    def _add_media_text(self, media_text: Mapping[str, MediaText]) -> None:
        """Adds each medium's token to the tokenizer (one special token; embeddings resized) and records its id."""
        unknown = sorted(set(media_text) - set(PLACEHOLDERS))
        if unknown:
            raise ValueError(f"media_text for unknown modalities {unknown}; known: {sorted(PLACEHOLDERS)}")
        token_ids = prepare_tokenizer(self.base_llm, self.tokenizer, [t.token for t in media_text.values()])
        self.media_text |= dict(media_text)
        self.placeholder_ids |= {m: token_ids[t.token] for m, t in media_text.items()}

    def media_tokens(self, modality: str, input_shape: tuple[int, ...]) -> int:
        """How many LLM tokens one preprocessed medium of ``input_shape`` becomes (1 marker for fusion)."""
        return self.connectors[modality].num_tokens(self.encoders[modality].num_tokens(input_shape))

    # ----------------------------------------------------------------- forward

    def features(self, modality: str, inputs: MediaBatch) -> EncoderOutput:
        """Encoder features of a collated batch of media (no gradient when the encoder is frozen), or the cached
        features the batch holds instead (``data.cache_features``)."""
        cached = cached_output(inputs)
        if cached is not None:
            return cached
        encoder = self.encoders[modality]
        frozen = not any(p.requires_grad for p in encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            return encoder(inputs)

    def embed(
        self,
        input_ids: torch.Tensor,
        media: Mapping[str, MediaBatch] | None = None,
        position_ids: torch.Tensor | None = None,
        media_repeat: int = 1,
        segments: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, FusionMedia]]:
        """Text embeddings ``[B, T, D]`` with token connectors' media tokens in their placeholder
        positions, and the fusion connectors' media laid out per sample (for the blocks).

        ``media_repeat`` r > 1 says rows come in groups of r that share their media (rows ``b*r .. b*r+r-1``
        hold sample b's media: a preference pair's two answers, a prompt's G samples): the media of the
        ``B / r`` samples are encoded and connected once and reused by every row of their group. ``segments``
        (``[B, T]``) marks the samples of packed rows, so that fusion connectors keep each sample's media to it.
        """
        embeds = self.llm.get_input_embeddings()(input_ids)  # [B, T, D]
        if input_ids.shape[0] % media_repeat:
            raise ValueError(f"media_repeat={media_repeat} does not divide the batch of {input_ids.shape[0]} rows")
        fused: dict[str, FusionMedia] = {}
        for modality, inputs in (media or {}).items():
            if inputs is None or media_count(inputs) == 0:
                continue
            connector = self.connectors[modality]
            out = self.features(modality, inputs)
            all_markers = input_ids == self.placeholder_ids[modality]  # [B, T]
            markers = all_markers[::media_repeat]  # the first row of each group: [B / r, T]
            num_markers = int(markers.sum())
            if isinstance(connector, FusionConnector):
                values, mask = connector.media(out.features, out.mask)
                if num_markers != values.shape[0]:
                    raise _count_error(modality, num_markers, values.shape[0], "1 marker token each")
                if position_ids is None:
                    position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
                row_segments = None if segments is None else segments[::media_repeat]
                laid_out = fusion.layout_media(values, mask, markers, position_ids[::media_repeat], row_segments)
                fused[modality] = laid_out.for_batch(input_ids.shape[0])
                continue
            tokens = connector.connect(out)  # [K, M, D]
            keep = connector.token_mask(out.mask)
            flat = tokens.reshape(-1, tokens.shape[-1]) if keep is None else tokens[keep]
            if num_markers != flat.shape[0]:
                raise _count_error(modality, num_markers, tokens.shape[0], f"{flat.shape[0]} tokens in all")
            if media_repeat > 1:  # each sample's tokens once per row of its group, in row-major order
                per_sample = flat.split(markers.sum(-1).tolist())
                flat = torch.cat([chunk for chunk in per_sample for _ in range(media_repeat)])
                if int(all_markers.sum()) != flat.shape[0]:
                    raise ValueError(f"{modality}: the rows of a media_repeat group have different placeholder counts")
            embeds = embeds.masked_scatter(all_markers.unsqueeze(-1), flat.to(embeds.dtype))
        return embeds, fused

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        media: Mapping[str, MediaBatch] | None = None,
        media_repeat: int = 1,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last hidden states ``[B, T, D]`` of the LLM's decoder for a (right- or left-) padded batch
        (``media_repeat`` as in ``embed``), or for packed rows: ``segments`` ``[B, T]`` numbers each row's samples
        1, 2, ... (0 on padding); each sample then sees only itself, its positions starting at 0."""
        if segments is not None:
            return packed_hidden(self, input_ids, segments, media)
        text_positions = positions_of(attention_mask)
        embeds, fused = self.embed(input_ids, media, text_positions, media_repeat)
        decoder = self.base_llm.get_decoder()
        position_ids = self.decoder_positions(input_ids, attention_mask, media, media_repeat)
        with self.fusion_state.active(fused, text_positions):
            out = decoder(
                inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            )
        return out.last_hidden_state

    def decoder_positions(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        media: Mapping[str, MediaBatch] | None = None,
        media_repeat: int = 1,
    ) -> torch.Tensor:
        """The position ids the decoder takes: 0, 1, 2, ... over each row's real tokens, or the model's own
        scheme's (``positions``)."""
        if self.positions is None:
            return positions_of(attention_mask)
        return self.positions.position_ids(self, input_ids, attention_mask, media or {}, media_repeat)

    @property
    def logit_softcap(self) -> float | None:
        """The LLM's final logit softcapping (Gemma 2's), or None."""
        return getattr(self.base_llm.config, "final_logit_softcapping", None) or None

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Applies the LM head (and final logit softcapping where the model has it)."""
        logits = self.base_llm.get_output_embeddings()(hidden)
        cap = self.logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def label_cross_entropy(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The summed cross-entropy of the LM head's logits at ``hidden`` ``[N, D]`` against ``targets`` ``[N]``:
        chunk by chunk from the hidden states for a plain head (``mmpost.losses.chunked_ce``), else from the
        logits."""
        head = self.base_llm.get_output_embeddings()
        if is_plain_head(head) and self.logit_softcap is None:
            return linear_cross_entropy_sum(hidden, head.weight, targets)
        return cross_entropy_sum(self.logits_from_hidden(hidden), targets)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        media: Mapping[str, MediaBatch] | None = None,
        labels: torch.Tensor | None = None,
        media_repeat: int = 1,
        share_prompt: bool = False,
        segments: torch.Tensor | None = None,
        head: str | None = None,
        cross_entropy: bool = False,
    ) -> TokenLogits:
        """Next-token logits at the positions that predict a label token, or at every position without ``labels``.

        Args:
            labels: ``[B, T]`` aligned with ``input_ids``, ``IGNORE`` where no loss reads the token.
            media_repeat: as in ``embed``.
            share_prompt: the rows of a ``media_repeat`` group also share every token before their first label
                (a pair's two answers, a prompt's G completions): the prompt passes the decoder once per group
                (``mmpost.model.shared_prompt``); the result is the same.
            segments: packed rows, as in ``hidden_states`` (``data.packing``).
            head: also return this head's values at every position (``TokenLogits.values``, ``[B, T]``); without
                ``labels`` then no logits at all (a reward model's forward). Rows are computed whole.
            cross_entropy: with ``labels``, return the label tokens' summed cross-entropy
                (``TokenLogits.cross_entropy``) instead of their logits (``label_cross_entropy``).

        Every loss of every stage reads this one output (``mmpost.losses``: cross-entropy, label log-probs,
        distillation divergences), so a distributed wrapper (DDP) sees each loss's forward.
        """
        if share_prompt and labels is not None and media_repeat > 1 and head is None:
            shared = shared_logits(self, input_ids, attention_mask, media, labels, media_repeat)
            if shared is not None:
                return shared
        hidden = self.hidden_states(input_ids, attention_mask, media, media_repeat, segments)
        values = (
            None if head is None else head_values(self, head, hidden, input_ids, attention_mask, media, media_repeat)
        )
        if labels is None:
            kept = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)  # [B, T]
            logits = None if head is not None else self.logits_from_hidden(hidden).flatten(0, 1)
            return TokenLogits(logits, kept, values=values)
        targets = labels[:, 1:]  # position t predicts token t + 1
        kept = targets != IGNORE  # [B, T-1]
        rows, targets = hidden[:, :-1][kept], targets[kept]
        if cross_entropy:
            return TokenLogits(None, kept, targets, values, self.label_cross_entropy(rows, targets))
        return TokenLogits(self.logits_from_hidden(rows), kept, targets, values)  # [N, V]

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        media: Mapping[str, MediaBatch] | None = None,
        max_new_tokens: int = 32,
        num_samples: int = 1,
        share_prefill: bool = True,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Continues left-padded prompts with the LLM's ``generate`` (KV cache on); returns new tokens only.

        Args:
            num_samples: continuations per prompt; rows ``b*G .. b*G+G-1`` of the result continue prompt b.
            share_prefill: with ``num_samples`` > 1, run the prompt (media and text) through the LLM once per
                prompt and give its KV cache to the G continuations, instead of letting ``generate`` repeat
                each prompt G times and prefill every copy. Both give the same tokens (greedy decoding).
            generate_kwargs: go to transformers' ``generate`` (``do_sample``, ``temperature``, ``top_p``...);
                decoding is greedy by default.

        Returns:
            ``[B * num_samples, L]`` new tokens, padded with the pad id after a sequence ends
            (``mmpost.model.generation``).
        """
        from mmpost.model.generation import generate

        return generate(
            self, input_ids, attention_mask, media, max_new_tokens, num_samples, share_prefill, **generate_kwargs
        )

    # ----------------------------------------------------------------- save / load

    @property
    def has_lora(self) -> bool:
        return has_lora(self.llm)

    def save(self, path, merge_lora: bool = False) -> None:
        """Writes a self-describing directory (see ``mmpost.model.format``) that ``mmpost.load`` reads."""

        save_lmm(self, path, merge_lora=merge_lora)
