"""InstructBLIP through mmpost: the Q-Former reads the instruction in its own tokenizer beside the image, and a
released checkpoint taken apart (tower, Q-Former with that tokenizer, Llama) gives transformers' logits and greedy
tokens, trains, saves, and exports back to ``InstructBlipForConditionalGeneration``."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
)

import mmpost
from mmpost.cli import main
from mmpost.data.pipeline import PromptPipeline
from mmpost.data.sample import Sample
from mmpost.export import export, read_report
from mmpost.families.blip2 import Blip2, InstructBlip
from mmpost.interfaces import EncoderOutput
from mmpost.synthetic.tiny_blip2 import NUM_QUERIES, make_tiny_instructblip
from mmpost.training.metrics import read_metrics

PROMPTS = ["What is it?", "Question: how many shapes are there? Answer:"]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    return make_tiny_instructblip(tmp_path_factory.mktemp("released") / "instructblip")


@pytest.fixture(scope="module")
def hf(released):
    return InstructBlipForConditionalGeneration.from_pretrained(released, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def processor(released):
    return AutoProcessor.from_pretrained(released)


@pytest.fixture(scope="module")
def model(released):
    return mmpost.from_pretrained(str(released)).eval()


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(48, 48), (40, 56)]]


def prompt_batch(model, images, prompts=PROMPTS):
    pipeline = PromptPipeline.for_model(model, max_length=256)
    samples = [
        Sample(id=str(i), messages=[{"role": "user", "content": "<image>\n" + p}], media={"image": [png(image)]})
        for i, (p, image) in enumerate(zip(prompts, images, strict=True))
    ]
    return pipeline.collate([pipeline.process(s) for s in samples])


def processor_inputs(processor, images, side: str):
    processor.tokenizer.padding_side = side
    return processor(images=images, text=PROMPTS, return_tensors="pt", padding=True)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(batch.input_ids, batch.attention_mask, batch.media).dense()[batch.attention_mask.bool()]


def test_the_pipeline_gives_the_processors_ids_pixels_and_instruction_tokens(model, processor, images):
    batch = prompt_batch(model, images)
    inputs = processor_inputs(processor, images, "left")
    real = inputs["input_ids"][inputs["attention_mask"].bool()]
    assert torch.equal(batch.input_ids[batch.attention_mask.bool()], real)
    media = batch.media["image"]
    assert (media["pixel_values"] - inputs["pixel_values"]).abs().max() <= 1e-6
    assert torch.equal(media["instruction_ids"], inputs["qformer_input_ids"])  # padded on the right, as theirs
    assert torch.equal(media["instruction_mask"], inputs["qformer_attention_mask"])
    assert batch.input_ids.shape[1] > NUM_QUERIES


def test_logits_equal_transformers_and_depend_on_the_instruction(model, hf, processor, images):
    batch = prompt_batch(model, images)
    inputs = processor_inputs(processor, images, "right")  # their Llama counts positions through padding
    with torch.no_grad():
        theirs = hf(**inputs).logits[inputs["attention_mask"].bool()]
    ours = logits(model, batch)
    assert (ours - theirs).abs().max() <= 1e-5 and theirs.abs().max() > 1
    # the same LLM prompt with another instruction for the Q-Former gives other image tokens
    media = dict(batch.media["image"])
    media["instruction_ids"] = media["instruction_ids"].flip(0)
    media["instruction_mask"] = media["instruction_mask"].flip(0)
    with torch.no_grad():
        other = model(batch.input_ids, batch.attention_mask, {"image": media}).dense()[batch.attention_mask.bool()]
    assert (other - ours).abs().max() > 1e-2


def test_greedy_generation_with_kv_cache_equals_transformers(model, hf, processor, images):
    batch = prompt_batch(model, images)
    inputs = processor_inputs(processor, images, "left")
    with torch.no_grad():
        theirs = hf.generate(**inputs, max_new_tokens=8, do_sample=False)[:, inputs["input_ids"].shape[1] :]
        ours = model.generate(batch.input_ids, batch.attention_mask, batch.media, max_new_tokens=8)
    assert torch.equal(ours, theirs) and len(set(ours.flatten().tolist())) > 2


def test_the_connector_refuses_features_without_instruction_tokens(model):
    features = torch.zeros(1, 17, model.encoders["image"].output_dim)
    with pytest.raises(ValueError, match="instruction's tokens"):
        model.connectors["image"].connect(EncoderOutput(features))


def test_saved_in_mmpost_format_it_reloads_with_its_qformer_tokenizer(model, images, tmp_path):
    model.save(tmp_path / "saved")
    loaded = mmpost.load(tmp_path / "saved").eval()  # rebuilt from the parts' specs alone
    encoder = loaded.encoders["image"]
    assert type(encoder).__name__ == "InstructBlipVisionEncoder"
    assert encoder.tokenizer("what is it")["input_ids"] == model.encoders["image"].tokenizer("what is it")["input_ids"]
    batch = prompt_batch(model, images)
    assert torch.equal(logits(loaded, batch), logits(model, batch))


def test_export_to_hf_reloads_with_mmposts_logits_and_back(model, images, tmp_path):
    assert InstructBlip().why_not(model) is None and Blip2().why_not(model) is not None
    out = export(model, tmp_path / "hf", fmt="hf")
    report = read_report(out)
    assert report["layout"] == "InstructBlipForConditionalGeneration"
    assert report["reload"]["greedy_agreement"] == "4/4" and report["reload"]["media_diff"] == 0.0
    reloaded = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    exported = AutoProcessor.from_pretrained(out)
    assert type(exported).__name__ == "InstructBlipProcessor"
    inputs = processor_inputs(exported, images, "right")
    batch = prompt_batch(model, images)
    with torch.no_grad():
        theirs = reloaded(**inputs).logits[inputs["attention_mask"].bool()]
    again = mmpost.from_pretrained(str(out)).eval()
    assert (logits(model, batch) - theirs).abs().max() <= 1e-4
    assert (logits(again, batch) - logits(model, batch)).abs().max() <= 1e-5


def test_lora_sft_from_the_released_checkpoint_exports_a_quantized_instructblip(released, tmp_path, synth_dir):
    cfg = {
        "stage": "sft",
        "out": str(tmp_path / "sft"),
        "from": f"hf:{released}",
        "model": {"lora": {"r": 8}},
        "data": {
            "train": {"path": str(synth_dir / "sft.json"), "image_root": str(synth_dir / "images")},
            "max_length": 256,
            "num_workers": 0,
        },
        "train": {"lr": 3e-3, "batch_size": 4, "max_steps": 8, "log_every": 1, "warmup_ratio": 0.0},
    }
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "sft.yaml")]) == 0
    losses = [r["loss"] for r in read_metrics(tmp_path / "sft") if "loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0]
    out = tmp_path / "w8"
    assert main(["export", str(tmp_path / "sft"), "--format", "hf", "--quantize", "w8a16", "--out", str(out)]) == 0
    report = read_report(out)
    assert report["layout"] == "InstructBlipForConditionalGeneration" and report["reload"]["greedy_agreement"] == "4/4"
    ignored = set(InstructBlipConfig.from_pretrained(out).quantization_config["ignore"])
    assert {"re:.*vision_model", "re:.*qformer", "re:.*language_projection"} <= ignored
