"""Tiny causal LMs and a locally trained tokenizer, for tests and the offline demo.

Nothing is downloaded: the tokenizer is a byte-level BPE trained with ``tokenizers`` on the given
texts, wrapped as a transformers fast tokenizer with a ChatML chat template (the template SmolLM2
and Qwen2 use); the model is a transformers Llama or Qwen2 built from a small config. Both are
saved with ``save_pretrained`` so that code under test loads them through ``from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# A small corpus covering the words of the synthetic tasks, so that a tiny vocabulary still gives
# one token to most words; callers add their own texts.
BASE_CORPUS = [
    "user assistant system",
    "Describe the image briefly. Write a short caption. What is in the picture? Summarize the image.",
    "What colour is the shape? What color are the shapes? What shape is it? Which shape is shown?",
    "How many shapes are there? How many shapes are in the image? Count the shapes.",
    "red green blue yellow purple orange black white grey",
    "Red. Green. Blue. Yellow. Circle. Square. Triangle.",
    "circle circles square squares triangle triangles shape shapes",
    "one two three four five 0 1 2 3 4 5 6 7 8 9",
    "one red circle. two blue squares. three green triangles. one yellow square.",
    "The answer is 2. The capital of France is Paris. A photo of a cat.",
]


def make_tiny_tokenizer(out_dir: str | Path, texts: Iterable[str] = (), vocab_size: int = 512):
    """Trains a byte-level BPE tokenizer on ``BASE_CORPUS`` plus ``texts`` and saves it to ``out_dir``.

    Returns:
        the transformers ``PreTrainedTokenizerFast`` (eos ``<|im_end|>``, pad ``<|endoftext|>``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = list(BASE_CORPUS) * 20 + list(texts)
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def make_tiny_llm(
    out_dir: str | Path,
    tokenizer=None,
    arch: str = "llama",
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 128,
    seed: int = 0,
) -> Path:
    """Builds a randomly initialised Llama or Qwen2 causal LM and saves it (with ``tokenizer``) to ``out_dir``.

    Args:
        out_dir: where ``save_pretrained`` writes the model.
        tokenizer: a tokenizer to save beside it; a new tiny one is trained when None.
        arch: "llama" or "qwen2".
        hidden_size, layers, heads, kv_heads, intermediate_size: the model's size.
        seed: weight initialisation seed.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    if tokenizer is None:
        tokenizer = make_tiny_tokenizer(out_dir)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(f"arch must be 'llama' or 'qwen2', got {arch!r}")
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
