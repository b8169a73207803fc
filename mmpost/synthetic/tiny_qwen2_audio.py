"""A tiny random ``Qwen2AudioForConditionalGeneration`` checkpoint, saved the way Qwen2-Audio-7B-Instruct is
(weights, ``Qwen2AudioProcessor`` with a Whisper feature extractor and a typed chat template), for tests and
examples of ``from: hf:``.

The audio tower is Qwen2-Audio's Whisper-style encoder at a toy width (d_model 32, 2 layers) but with the real
128 mel bands and 1500 positions: the class accepts only whole 30 s windows (3000 mel frames), which the
processor pads every clip to. The text model is a 2-layer Qwen2. The chat template follows the released one:
ChatML with a default system turn, each audio part written ``Audio N: <|audio_bos|><|AUDIO|><|audio_eos|>\\n``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmpost.synthetic.tiny_llm import make_tiny_tokenizer

AUDIO_TOKENS = ["<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"]

QWEN2_AUDIO_TEMPLATE = (
    "{%- set audio_count = namespace(value=0) -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'audio' -%}"
    "{%- set audio_count.value = audio_count.value + 1 -%}"
    "{{- 'Audio ' ~ audio_count.value ~ ': <|audio_bos|><|AUDIO|><|audio_eos|>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def make_tiny_qwen2_audio(out_dir: str | Path, seed: int = 0) -> Path:
    """A random ``Qwen2AudioForConditionalGeneration`` with its processor, written to ``out_dir``."""
    from transformers import (
        GenerationConfig,
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        Qwen2Config,
        WhisperFeatureExtractor,
    )

    out = Path(out_dir)
    tokenizer = make_tiny_tokenizer(out)
    tokenizer.add_tokens(AUDIO_TOKENS, special_tokens=True)
    audio = dict(
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        num_mel_bins=128,
        max_source_positions=1500,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,  # Qwen2-Audio's LM head is its own tensor, as in the released model
        initializer_range=0.2,  # sharper logits than the default 0.02, so greedy tokens vary
    )
    config = Qwen2AudioConfig(
        audio_config=audio,
        text_config=text.to_dict(),
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
    )
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None
    )
    model.save_pretrained(out)
    Qwen2AudioProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=128),
        tokenizer=tokenizer,
        chat_template=QWEN2_AUDIO_TEMPLATE,
    ).save_pretrained(out)
    return out
