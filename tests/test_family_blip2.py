"""BLIP-2 through mmpost: a released checkpoint taken apart (tower, Q-Former, OPT) gives transformers' logits and
greedy tokens, mmpost's pipeline gives its processor's ids and pixels, and an hf export reloads in transformers."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    Blip2Config,
    Blip2ForConditionalGeneration,
    T5Config,
)

import mmpost
from mmpost.data.pipeline import ConversationPipeline, PromptPipeline
from mmpost.data.sample import Sample
from mmpost.export import export, read_report
from mmpost.families import CheckpointError
from mmpost.families.blip2 import Blip2
from mmpost.interfaces import IGNORE
from mmpost.synthetic.tiny_blip2 import NUM_QUERIES, make_tiny_blip2

PROMPTS = ["What is it?", "Question: how many shapes are there? Answer:"]
MISSING = "qformer.encoder.layer.1.attention.attention.query.weight"


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    return make_tiny_blip2(tmp_path_factory.mktemp("released") / "blip2")


@pytest.fixture(scope="module")
def hf(released):
    return Blip2ForConditionalGeneration.from_pretrained(released, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def processor(released):
    return AutoProcessor.from_pretrained(released)


@pytest.fixture(scope="module")
def model(released):
    return mmpost.from_pretrained(str(released)).eval()


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)  # two sizes: the processor resizes both to 32 x 32
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(48, 48), (40, 56)]]


def samples(images, answers=None):
    out = []
    for i, (prompt, image) in enumerate(zip(PROMPTS, images, strict=True)):
        messages = [{"role": "user", "content": "<image>\n" + prompt}]
        if answers:
            messages.append({"role": "assistant", "content": answers[i]})
        out.append(Sample(id=str(i), messages=messages, media={"image": [png(image)]}))
    return out


@pytest.fixture(scope="module")
def prompt_batch(model, images):
    pipeline = PromptPipeline.for_model(model, max_length=256)
    return pipeline.collate([pipeline.process(s) for s in samples(images)])


def processor_inputs(processor, images, side: str = "left"):
    """What a transformers user feeds BLIP-2: the plain prompts, padded (after the image tokens) on ``side``."""
    processor.tokenizer.padding_side = side
    return processor(images=images, text=PROMPTS, return_tensors="pt", padding=True)


def real(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[N, V]`` the logits at real tokens, in order: the processor and mmpost pad at different places."""
    return logits[attention_mask.bool()]


def prompt_batch_args(batch):
    return batch.input_ids, batch.attention_mask, batch.media


def test_the_pipeline_gives_the_processors_ids_and_pixels(model, processor, images, prompt_batch):
    pipeline = PromptPipeline.for_model(model, max_length=256)
    image_id, bos = model.placeholder_ids["image"], model.tokenizer.bos_token_id
    for sample, prompt, image in zip(samples(images), PROMPTS, images, strict=True):
        ours = pipeline.process(sample).rows[0].input_ids
        theirs = processor(images=[image], text=[prompt])["input_ids"][0]
        assert ours == list(theirs)
        assert ours[: NUM_QUERIES + 1] == [image_id] * NUM_QUERIES + [bos]  # the image before BOS
    inputs = processor_inputs(processor, images)
    ours = prompt_batch.input_ids[prompt_batch.attention_mask.bool()]
    assert torch.equal(ours, inputs["input_ids"][inputs["attention_mask"].bool()])
    assert (prompt_batch.media["image"] - inputs["pixel_values"]).abs().max() <= 1e-6


def test_logits_equal_transformers_on_a_padded_batch(model, hf, processor, images, prompt_batch):
    inputs = processor_inputs(processor, images)
    with torch.no_grad():
        theirs = real(hf(**inputs).logits, inputs["attention_mask"])
        ours = real(model(*prompt_batch_args(prompt_batch)).dense(), prompt_batch.attention_mask)
    assert (ours - theirs).abs().max() <= 1e-5
    assert theirs.abs().max() > 1  # not a comparison of near-zero logits


def test_greedy_generation_with_kv_cache_equals_transformers(model, hf, processor, images, prompt_batch):
    inputs = processor_inputs(processor, images)
    with torch.no_grad():
        theirs = hf.generate(**inputs, max_new_tokens=8, do_sample=False)[:, inputs["input_ids"].shape[1] :]
        ours = model.generate(*prompt_batch_args(prompt_batch), max_new_tokens=8)
    assert torch.equal(ours, theirs)
    assert len(set(ours.flatten().tolist())) > 2  # the tiny model does not repeat one token


def test_a_training_reply_is_learnt_after_the_processors_prompt_with_eos(model, processor, images):
    answers = ["a red circle", "two"]
    pipeline = ConversationPipeline.for_model(model, max_length=256)
    eos = model.tokenizer.eos_token_id
    for sample, prompt, answer, image in zip(samples(images, answers), PROMPTS, answers, images, strict=True):
        row = pipeline.process(sample).rows[0]
        prompt_ids = list(processor(images=[image], text=[prompt])["input_ids"][0])
        full = list(processor(images=[image], text=[f"{prompt} {answer}"])["input_ids"][0])
        assert row.input_ids == [*full, eos]
        cut = len(prompt_ids)
        assert row.labels == [IGNORE] * cut + row.input_ids[cut:]


def test_an_imported_model_saves_and_loads_in_mmpost_from_its_parts_specs(model, prompt_batch, tmp_path):
    model.save(tmp_path / "saved")
    loaded = mmpost.load(tmp_path / "saved").eval()  # blip_vision and qformer rebuilt from spec, no checkpoint
    assert type(loaded.encoders["image"]).__name__ == "BlipVisionEncoder"
    with torch.no_grad():
        ours = model(*prompt_batch_args(prompt_batch)).dense()
        assert torch.equal(loaded(*prompt_batch_args(prompt_batch)).dense(), ours)


def test_export_to_hf_reloads_with_mmposts_logits(model, processor, images, prompt_batch, tmp_path):
    out = export(model, tmp_path / "hf", fmt="hf")
    report = read_report(out)
    assert report["layout"] == "Blip2ForConditionalGeneration" and report["reload"]["greedy_agreement"] == "4/4"
    reloaded = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    exported = AutoProcessor.from_pretrained(out)
    assert exported.chat_template is None and exported.tokenizer.chat_template is None  # the plain prompt is the API
    inputs = processor_inputs(exported, images)
    with torch.no_grad():
        ours = real(model(*prompt_batch_args(prompt_batch)).dense(), prompt_batch.attention_mask)
        theirs = real(reloaded(**inputs).logits, inputs["attention_mask"])
        again = mmpost.from_pretrained(str(out)).eval()  # and back into mmpost
        round_trip = real(again(*prompt_batch_args(prompt_batch)).dense(), prompt_batch.attention_mask)
    assert (ours - theirs).abs().max() <= 1e-4
    assert (ours - round_trip).abs().max() <= 1e-5


def test_a_quantized_export_keeps_the_media_parts_in_float_and_generates_in_transformers(released, tmp_path):
    model = mmpost.from_pretrained(str(released)).eval()
    out = export(model, tmp_path / "q", fmt="hf", quantize="w8a16")
    report = read_report(out)
    assert report["quantization"]["scheme"].startswith("int8") and report["reload"]["greedy_agreement"] == "4/4"
    config = Blip2Config.from_pretrained(out).quantization_config
    assert {"re:.*vision_model", "re:.*qformer", "re:.*language_projection"} <= set(config["ignore"])


def test_a_model_rendered_with_another_template_does_not_fit_the_layout(released):
    model = mmpost.from_pretrained(str(released))
    assert Blip2().why_not(model) is None
    model.tokenizer.chat_template = "{{ messages[0]['content'] }}"
    assert "prompt layout" in Blip2().why_not(model)


def test_a_checkpoint_missing_a_tensor_is_refused_naming_it(released, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(released, broken)
    weights = broken / "model.safetensors"
    state = load_file(weights)
    del state[MISSING]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=MISSING.replace(".", r"\.")):
        mmpost.from_pretrained(str(broken))


def test_a_t5_language_model_is_refused_before_loading_weights(tmp_path):
    text = T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=64)
    config = Blip2Config(text_config=text.to_dict(), image_token_index=3)
    config.architectures = ["Blip2ForConditionalGeneration"]
    config.save_pretrained(tmp_path)  # no weights at all
    with pytest.raises(CheckpointError, match="t5 language model"):
        mmpost.from_pretrained(str(tmp_path))
