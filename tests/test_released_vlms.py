"""Released VLMs imported into mmpost compute what their transformers classes compute: LLaVA-1.5-hf, Qwen2-VL and
Qwen2.5-VL (tiny random checkpoints saved and reloaded locally) on image + text batches padded on either side."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import transformers
from helpers import make_batch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor

import mmpost
from mmpost.data.sample import Sample
from mmpost.families import CheckpointError
from mmpost.synthetic.tiny_released import make_tiny_llava, make_tiny_qwen2_vl

CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}
MAKERS = {
    "llava": make_tiny_llava,
    "qwen2_vl": lambda out: make_tiny_qwen2_vl(out, "2"),
    "qwen2_5_vl": lambda out: make_tiny_qwen2_vl(out, "2.5"),
}


@pytest.fixture(scope="module", params=list(CLASSES))
def released(request, tmp_path_factory):
    """(name, checkpoint folder, transformers model, processor, imported mmpost model)."""
    out = MAKERS[request.param](tmp_path_factory.mktemp(request.param))
    hf = getattr(transformers, CLASSES[request.param]).from_pretrained(out, dtype=torch.float32).eval()
    model = mmpost.from_pretrained(str(out)).eval()
    return request.param, out, hf, AutoProcessor.from_pretrained(out), model


def picture(height: int, width: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# Two samples of different lengths; for Qwen2-VL the first holds two images of other sizes (dynamic resolution)
CASES = [
    ("Compare the two pictures.", [(64, 64), (40, 56)], "The left one is red."),
    ("What is in it?", [(48, 32)], "A square."),
]


def samples_and_typed(name: str, with_answer: bool):
    """mmpost samples, transformers' typed messages and the images for the same conversations."""
    samples, conversations, images = [], [], []
    for i, (question, sizes, answer) in enumerate(CASES):
        sizes = sizes if name != "llava" else sizes[:1]  # LLaVA-1.5 reads one image per prompt
        pictures = [picture(h, w, seed=10 * i + k) for k, (h, w) in enumerate(sizes)]
        text = "".join("<image>\n" for _ in pictures) + question
        messages = [{"role": "user", "content": text}]
        typed = [
            {"role": "user", "content": [{"type": "image"}] * len(pictures) + [{"type": "text", "text": question}]}
        ]
        if with_answer:
            messages.append({"role": "assistant", "content": answer})
            typed.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        samples.append(Sample(id=f"s{i}", messages=messages, media={"image": [png(p) for p in pictures]}))
        conversations.append(typed)
        images += pictures
    return samples, conversations, images


def processor_batch(processor, conversations, images, side: str, generation_prompt: bool):
    texts = [
        processor.apply_chat_template(c, tokenize=False, add_generation_prompt=generation_prompt) for c in conversations
    ]
    processor.tokenizer.padding_side = side
    return dict(processor(images=images, text=texts, padding=True, return_tensors="pt"))


def our_pixels(name: str, media) -> torch.Tensor:
    return media["image"]["pixel_values"] if name != "llava" else media["image"]


@pytest.mark.parametrize("side", ["right", "left"])
def test_imported_model_equals_transformers_on_padded_batches(released, side):
    name, _, hf, processor, model = released
    with_answer = side == "right"  # training batches are right-padded, prompts left-padded
    samples, conversations, images = samples_and_typed(name, with_answer)
    batch = make_batch(model, samples, kind="conversation" if with_answer else "prompt")
    inputs = processor_batch(processor, conversations, images, side, generation_prompt=not with_answer)

    # preprocessing: the processor's expanded placeholder ids and pixel values
    assert torch.equal(batch.input_ids, inputs["input_ids"])
    assert torch.equal(batch.attention_mask, inputs["attention_mask"])
    assert torch.equal(our_pixels(name, batch.media), inputs["pixel_values"])
    if name != "llava":
        assert torch.equal(batch.media["image"]["grid_thw"], inputs["image_grid_thw"])
        assert batch.media["image"]["grid_thw"].tolist()[:2] == [[1, 16, 16], [1, 10, 14]]

    real = batch.attention_mask.bool()
    extra = {}
    if name == "llava":  # transformers' LLaVA forward counts positions from 0 over padding; give it the real ones
        extra["position_ids"] = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        theirs = hf(**inputs, **extra).logits
        ours = model(batch.input_ids, batch.attention_mask, batch.media).dense()
    assert ours.shape == theirs.shape
    assert (ours[real] - theirs[real]).abs().max() < 1e-5


def test_greedy_generation_with_the_kv_cache_equals_transformers(released):
    name, _, hf, processor, model = released
    samples, conversations, images = samples_and_typed(name, with_answer=False)
    batch = make_batch(model, samples, kind="prompt")
    inputs = processor_batch(processor, conversations, images, "left", generation_prompt=True)
    with torch.no_grad():
        theirs = hf.generate(**inputs, max_new_tokens=8, do_sample=False)[:, inputs["input_ids"].shape[1] :]
        ours = model.generate(batch.input_ids, batch.attention_mask, batch.media, max_new_tokens=8)
        shared = model.generate(batch.input_ids, batch.attention_mask, batch.media, max_new_tokens=8, num_samples=2)
    assert torch.equal(ours, theirs)
    assert len(set(theirs[0].tolist())) > 1  # the tiny model does not just repeat one token
    assert torch.equal(shared[::2], ours) and torch.equal(shared[1::2], ours)  # one prefill for both samples


def test_saved_imported_model_reloads_with_its_media_text_and_positions(released, tmp_path):
    name, _, _, _, model = released
    model.save(tmp_path / "saved")
    reloaded = mmpost.load(tmp_path / "saved").eval()
    assert reloaded.media_text == model.media_text and reloaded.typed_chat == model.typed_chat
    assert type(reloaded.positions) is type(model.positions)
    assert len(reloaded.tokenizer) == len(model.tokenizer)  # no placeholder of another modality was added
    samples, _, _ = samples_and_typed(name, with_answer=True)
    batch = make_batch(model, samples)
    with torch.no_grad():
        assert torch.equal(
            reloaded(batch.input_ids, batch.attention_mask, batch.media).logits,
            model(batch.input_ids, batch.attention_mask, batch.media).logits,
        )


def test_an_unsupported_class_names_the_supported_ones(tmp_path, llm_dir):
    with pytest.raises(CheckpointError, match=r"LlamaForCausalLM; mmpost imports .*LlavaForConditionalGeneration"):
        mmpost.from_pretrained(str(llm_dir))


def test_a_checkpoint_with_missing_tensors_names_them(tmp_path):
    out = make_tiny_llava(tmp_path / "llava")
    weights = out / "model.safetensors"
    state = load_file(str(weights))
    key = next(k for k in state if "multi_modal_projector.linear_2.weight" in k)
    del state[key]
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"1 tensors missing \(.*multi_modal_projector\.linear_2\.weight"):
        mmpost.from_pretrained(str(out))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
