"""Tiny random checkpoints of released VLM classes (LLaVA-1.5-hf, Qwen2-VL, Qwen2.5-VL), saved the way the
released ones are (weights, processor, chat template), for tests and examples of ``from: hf:``.

Each is the transformers class built from a small config and written with ``save_pretrained``, so mmpost
reads it through the same path as a downloaded checkpoint. The chat templates follow the released ones'
conventions (LLaVA-1.5: ``USER: <image>\\n... ASSISTANT:`` in the processor only; Qwen2-VL: ChatML with
``<|vision_start|><|image_pad|><|vision_end|>`` in the tokenizer and the processor), written here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmpost.synthetic.tiny_llm import make_tiny_tokenizer

LLAVA_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- message['role'].upper() + ': ' -}}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{- '<image>\\n' -}}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{- part['text'] -}}{%- endfor -%}"
    "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- endif -%}"
    "{{- ' ' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

QWEN2_VL_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
QWEN_VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _text_sizes(tokenizer, hidden_size: int = 64) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        initializer_range=0.2,  # sharper logits than the default 0.02, so greedy tokens vary
    )


def _finish(model, tokenizer, out: Path) -> None:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None
    )
    model.save_pretrained(out)


def make_tiny_llava(out_dir: str | Path, seed: int = 0, image_size: int = 32, patch_size: int = 8) -> Path:
    """A random ``LlavaForConditionalGeneration`` (CLIP tower, 2-layer GELU projector, Llama) with its processor."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    out = Path(out_dir)
    tokenizer = make_tiny_tokenizer(out)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.chat_template = None  # LLaVA-1.5-hf keeps its template in the processor
    vision = CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    config = LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=LlamaConfig(**_text_sizes(tokenizer)).to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    _finish(LlavaForConditionalGeneration(config), tokenizer, out)
    LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    ).save_pretrained(out)
    return out


def make_tiny_qwen2_vl(out_dir: str | Path, version: str = "2", seed: int = 0) -> Path:
    """A random ``Qwen2VLForConditionalGeneration`` (``version`` "2") or ``Qwen2_5_VLForConditionalGeneration``
    ("2.5": windowed attention in the tower) with its processor; patches of 4 pixels, merged 2 x 2."""
    import transformers
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    out = Path(out_dir)
    tokenizer = make_tiny_tokenizer(out)
    tokenizer.add_tokens(QWEN_VISION_TOKENS, special_tokens=True)
    tokenizer.chat_template = QWEN2_VL_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_VISION_TOKENS}
    text = _text_sizes(tokenizer) | {
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    }
    patches = dict(patch_size=4, spatial_merge_size=2, temporal_patch_size=2, num_heads=2, depth=2)
    if version == "2":
        class_name, config_name = "Qwen2VLForConditionalGeneration", "Qwen2VLConfig"
        vision = patches | dict(embed_dim=32, hidden_size=64, mlp_ratio=2)
    elif version == "2.5":
        class_name, config_name = "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig"
        vision = patches | dict(
            hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=16, fullatt_block_indexes=[1]
        )
    else:
        raise ValueError(f"version must be '2' or '2.5', got {version!r}")
    config = getattr(transformers, config_name)(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    _finish(getattr(transformers, class_name)(config), tokenizer, out)
    sizes = dict(patch_size=4, temporal_patch_size=2, merge_size=2)
    Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64}, **sizes),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**sizes),
        chat_template=QWEN2_VL_TEMPLATE,
    ).save_pretrained(out)
    return out
