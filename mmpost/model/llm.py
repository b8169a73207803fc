"""Loading the LLM and its tokenizer, and adding media placeholder tokens."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mmpost.config.schema import LLMConfig
from mmpost.weights import locate_pretrained

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_llm(cfg: LLMConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads the causal LM and tokenizer named by ``cfg`` through transformers' ``from_pretrained``.

    Raises:
        ValueError: if ``cfg.path`` is empty.
        FileNotFoundError: if a local path does not exist, or a hub id is neither cached nor reachable
            (offline mode, or no connection to the hub).
    """
    if not cfg.path:
        raise ValueError("model.llm.path is empty: name a transformers model directory or hub id")
    where = locate_pretrained(cfg.path, "model.llm.path")  # a cached hub id loads from its folder, offline
    extra = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=cfg.trust_remote_code, **extra)
    model = AutoModelForCausalLM.from_pretrained(
        where,
        dtype=DTYPES[cfg.dtype],
        attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code,
        **extra,
    )
    if cfg.gguf_file:
        # transformers dequantizes GGUF weights on load but keeps marking the model as GGUF-quantized,
        # which forbids save_pretrained; from here on it is a plain float model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if cfg.chat_template:
        template = cfg.chat_template
        if template.endswith(".jinja") and Path(template).is_file():
            template = Path(template).read_text()
        tokenizer.chat_template = template
    return model, tokenizer


def prepare_tokenizer(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, placeholders: list[str]
) -> dict[str, int]:
    """Adds each placeholder as one special token, gives the tokenizer a pad token, resizes embeddings.

    The placeholder rows of the embedding matrix are never read (media features replace them), so
    their initial values do not matter; they exist so that the ids are valid and so that an export
    to transformers' LLaVA layout, which embeds ``input_ids`` before splicing, works unchanged.

    Returns:
        ``{placeholder: token_id}``.
    """
    new = [p for p in placeholders if p not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and labels, so any id works; eos is what
        # most chat models already use.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    ids = {}
    for p in placeholders:
        encoded = tokenizer.encode(p, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"placeholder {p!r} tokenizes to {encoded}, expected one special token")
        ids[p] = encoded[0]
    return ids
