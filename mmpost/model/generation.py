"""Generation for the LMM: the prompt's media and text embedded once, then transformers' ``generate`` with the
KV cache; optionally one prefill per prompt shared by its G samples (RL rollouts).

Position ids: transformers computes 0, 1, 2, ... over the real tokens itself; a model with its own scheme
(``LMM.positions``, Qwen2-VL's M-RoPE) hands the prompt's ids to ``generate``, which continues every id row
by one per new token.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from transformers import DynamicCache

from mmpost.interfaces import MediaBatch
from mmpost.model.positions import positions_of


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    media: Mapping[str, MediaBatch] | None,
    max_new_tokens: int,
    num_samples: int,
    share_prefill: bool,
    **kwargs,
) -> torch.Tensor:
    """``LMM.generate`` of ``model`` (an LMM; this module is the LMM's and does not import it back): new tokens
    ``[B * num_samples, L]`` for left-padded prompts."""
    if attention_mask[:, -1].min() == 0:
        raise ValueError("generate() needs left-padded prompts (pad on the left, last column all real tokens)")
    position_ids = positions_of(attention_mask)  # what transformers' generate() computes too
    embeds, fused = model.embed(input_ids, media, position_ids)
    kwargs.setdefault("do_sample", False)
    # transformers keeps the processes of a sharded model generating in lock step (an all-reduce per token);
    # mmpost generates with every shard gathered (mmpost.training.sharding), so each process goes alone
    kwargs.setdefault("synced_gpus", False)
    kwargs.setdefault("pad_token_id", model.tokenizer.pad_token_id)
    # a media placeholder in generated text would stand for media that do not exist
    kwargs.setdefault("suppress_tokens", sorted(model.placeholder_ids.values()))
    if model.base_llm.generation_config.eos_token_id is None:
        kwargs.setdefault("eos_token_id", model.tokenizer.eos_token_id)
    if model.positions is not None:  # the prompt's own positions, which transformers continues by one per token
        kwargs["position_ids"] = model.positions.position_ids(
            model,
            input_ids.repeat_interleave(num_samples, dim=0),
            attention_mask.repeat_interleave(num_samples, dim=0),
            media or {},
            num_samples,
        )
    if num_samples > 1 and share_prefill:
        return _generate_shared(
            model, input_ids, attention_mask, media, embeds, fused, max_new_tokens, num_samples, kwargs
        )
    if num_samples > 1:  # every prompt repeated G times and prefilled G times (transformers' own way)
        embeds = embeds.repeat_interleave(num_samples, dim=0)
        attention_mask = attention_mask.repeat_interleave(num_samples, dim=0)
    with model.fusion_state.active(fused, positions_of(attention_mask)):
        return model.llm.generate(
            inputs_embeds=embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens, **kwargs
        )


def _generate_shared(model, input_ids, attention_mask, media, embeds, fused, max_new_tokens, num_samples, kwargs):
    """``generate`` with the prompt prefilled once per prompt and its KV cache repeated for the samples.

    All prompt tokens but the last run through the decoder here on the ``B`` prompts (media included);
    the cache is repeated ``G`` times along the batch and handed to transformers' ``generate`` with the
    repeated token ids, so ``generate`` computes only the last prompt token (always text: the generation
    prompt) and the new ones. This is transformers' documented prefix-cache reuse.
    """
    if any(bool((input_ids[:, -1] == p).any()) for p in model.placeholder_ids.values()):
        raise ValueError("a prompt ending in a media placeholder cannot share its prefill")
    position_ids = positions_of(attention_mask)
    decoder_positions = model.decoder_positions(input_ids, attention_mask, media)
    decoder = model.base_llm.get_decoder()
    cache_arg = cache_argument(decoder)
    cache = DynamicCache(config=model.base_llm.config)
    with model.fusion_state.active(fused, position_ids[:, :-1]):
        decoder(
            inputs_embeds=embeds[:, :-1],
            attention_mask=attention_mask[:, :-1],
            position_ids=decoder_positions[..., :-1],
            use_cache=True,
            **{cache_arg: cache},
        )
    cache.batch_repeat_interleave(num_samples)
    ids = input_ids.repeat_interleave(num_samples, dim=0)
    mask = attention_mask.repeat_interleave(num_samples, dim=0)
    with model.fusion_state.active(fused, positions_of(mask)):
        out = model.llm.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, **{cache_arg: cache}, **kwargs
        )
    return out[:, ids.shape[1] :]


def cache_argument(decoder: torch.nn.Module) -> str:
    """The name of the KV cache argument: ``cache`` in recent transformers 5 releases, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
