"""Tiny random BLIP-2 and InstructBLIP checkpoints, saved the way the released ones are (weights, processor; no
chat template), for tests and examples of ``from: hf:``.

Each is the transformers class built from a small config (a 2-layer ViT on 32-pixel images in 8-pixel patches, a
2-layer Q-Former with 6 queries, a 2-layer OPT for BLIP-2 as in ``blip2-opt-*``, a 2-layer Llama for InstructBLIP
as in ``instructblip-vicuna-*``) and written with ``save_pretrained``. The tokenizer starts every text with a BOS
token, as OPT's and Llama's do, so that the BOS after the image tokens is exercised.

Every part starts with weights of std 0.2 (transformers' defaults are 0.02, and 1e-10 for BLIP-2's tower) and
random query tokens (transformers starts them at zero, where every query reads the image alike): the image then
moves the logits as much as the text does, a wrong query order shows, and greedy tokens vary.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from mmpost.synthetic.tiny_llm import make_tiny_tokenizer

NUM_QUERIES = 6
IMAGE_SIZE = 32
INIT = 0.2
_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=IMAGE_SIZE,
    patch_size=8,
    initializer_range=INIT,
)
_QFORMER = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, initializer_range=INIT
)
_TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512)


def _tokenizer():
    """The tiny BPE tokenizer with a BOS it puts before every text and BLIP-2's ``<image>`` token."""
    with tempfile.TemporaryDirectory() as scratch:  # its own files (a ChatML template) are not the checkpoint's
        tokenizer = make_tiny_tokenizer(scratch)
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    tokenizer.add_bos_token = True
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.chat_template = None
    return tokenizer


def _text_ids(tokenizer) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _build(model_cls, config):
    from transformers import GenerationConfig

    model = model_cls(config)
    with torch.no_grad():
        model.query_tokens.normal_(std=1.0)
    text = config.text_config
    model.generation_config = GenerationConfig(
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id
    )
    return model


def _image_processor():
    from transformers import BlipImageProcessor

    return BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def make_tiny_blip2(out_dir: str | Path, seed: int = 0) -> Path:
    """A random ``Blip2ForConditionalGeneration`` (OPT language model) with its ``Blip2Processor``."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, OPTConfig

    out = Path(out_dir)
    tokenizer = _tokenizer()
    text = OPTConfig(**_TEXT, word_embed_proj_dim=64, ffn_dim=128, init_std=INIT, **_text_ids(tokenizer))
    config = Blip2Config(
        vision_config=_VISION,
        qformer_config=_QFORMER,
        text_config=text.to_dict(),
        num_query_tokens=NUM_QUERIES,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        initializer_range=INIT,
    )
    torch.manual_seed(seed)
    _build(Blip2ForConditionalGeneration, config).save_pretrained(out)
    Blip2Processor(
        image_processor=_image_processor(), tokenizer=tokenizer, num_query_tokens=NUM_QUERIES
    ).save_pretrained(out)
    return out


def make_tiny_instructblip(out_dir: str | Path, seed: int = 0) -> Path:
    """A random ``InstructBlipForConditionalGeneration`` (Llama language model) with its ``InstructBlipProcessor``,
    whose Q-Former tokenizer is a second tiny tokenizer (BERT-style: no BOS, pad id 0 as the Q-Former expects)."""
    from transformers import (
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
        LlamaConfig,
    )

    out = Path(out_dir)
    tokenizer = _tokenizer()
    with tempfile.TemporaryDirectory() as scratch:
        qformer_tokenizer = make_tiny_tokenizer(scratch, vocab_size=256)
    qformer_tokenizer.chat_template = None
    text = LlamaConfig(
        **_TEXT, intermediate_size=128, num_key_value_heads=2, initializer_range=INIT, **_text_ids(tokenizer)
    )
    qformer = _QFORMER | dict(vocab_size=len(qformer_tokenizer), pad_token_id=qformer_tokenizer.pad_token_id)
    config = InstructBlipConfig(
        vision_config=_VISION,
        qformer_config=qformer,
        text_config=text.to_dict(),
        num_query_tokens=NUM_QUERIES,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        initializer_range=INIT,
    )
    torch.manual_seed(seed)
    _build(InstructBlipForConditionalGeneration, config).save_pretrained(out)
    InstructBlipProcessor(
        image_processor=_image_processor(),
        tokenizer=tokenizer,
        qformer_tokenizer=qformer_tokenizer,
        num_query_tokens=NUM_QUERIES,
    ).save_pretrained(out)
    return out
