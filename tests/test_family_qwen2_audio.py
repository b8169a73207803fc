"""Qwen2-Audio through mmpost: a released checkpoint imports into a ``qwen2_audio`` encoder, an ``audio_pooler``
connector and a Qwen2 causal LM that compute what ``Qwen2AudioForConditionalGeneration`` computes, with the
checkpoint's own preprocessing, and exports back to a checkpoint transformers reloads."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import soundfile
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForMultimodalLM, AutoProcessor, Qwen2AudioForConditionalGeneration

import mmpost
from mmpost.connectors import CONNECTORS
from mmpost.data.pipeline import PromptPipeline
from mmpost.data.sample import Sample
from mmpost.encoders import ENCODERS
from mmpost.export import export, read_report
from mmpost.families import CheckpointError, ExportError, family_for
from mmpost.synthetic.tiny_audio import make_tiny_whisper
from mmpost.synthetic.tiny_qwen2_audio import make_tiny_qwen2_audio

RATE = 16_000
PROMPTS = ("What is it?", "How many beeps are there in this clip, and how long is each?")


def tone(seconds: float, pitch: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * pitch * t)).astype(np.float32)


def wav_bytes(waveform: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, waveform, RATE, format="WAV", subtype="FLOAT")  # float samples decode exactly
    return buffer.getvalue()


# 131 and 205 mel frames: an even (66) and an odd (103) number of real positions after the convolution
CLIPS = (tone(1.31, 440.0), np.concatenate([tone(1.0, 660.0), tone(1.05, 330.0)]))


@pytest.fixture(scope="module")
def released(tmp_path_factory, one_thread):
    return make_tiny_qwen2_audio(tmp_path_factory.mktemp("qwen2_audio"), seed=0)


@pytest.fixture(scope="module")
def hf(released):
    return Qwen2AudioForConditionalGeneration.from_pretrained(released, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model(released):
    return mmpost.from_pretrained(released).eval()


def processor_inputs(directory, clips=CLIPS, prompts=PROMPTS):
    """What a transformers user gives the model: the processor's template and left-padded batch."""
    processor = AutoProcessor.from_pretrained(directory)
    processor.tokenizer.padding_side = "left"
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": prompt}]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for prompt in prompts
    ]
    return processor(text=texts, audio=list(clips), sampling_rate=RATE, padding=True, return_tensors="pt")


def mmpost_batch(model, clips=CLIPS, prompts=PROMPTS):
    """The same prompts as mmpost's data writes them, through its prompt pipeline."""
    pipeline = PromptPipeline.for_model(model, max_length=4096)
    samples = [
        Sample(id=str(i), messages=[{"role": "user", "content": "<audio>\n" + p}], media={"audio": [wav_bytes(c)]})
        for i, (p, c) in enumerate(zip(prompts, clips, strict=True))
    ]
    return pipeline.collate([pipeline.process(s) for s in samples])


@pytest.fixture(scope="module")
def inputs(released):
    return processor_inputs(released)


@pytest.fixture(scope="module")
def batch(model):
    return mmpost_batch(model)


def generation_positions(attention_mask):
    """The position ids transformers' ``generate`` gives a left-padded batch (and mmpost every forward)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def test_import_takes_the_checkpoint_apart_into_mmpost_parts(model):
    assert ENCODERS.name_of(type(model.encoders["audio"])) == "qwen2_audio"
    assert CONNECTORS.name_of(type(model.connectors["audio"])) == "audio_pooler"
    assert type(model.base_llm).__name__ == "Qwen2ForCausalLM"
    assert model.media_text["audio"].text == "<|audio_bos|><|AUDIO|><|audio_eos|>" and model.typed_chat
    assert not any(p.is_meta for p in model.parameters())


def test_preprocessing_equals_the_checkpoints_processor(inputs, batch):
    assert inputs["feature_attention_mask"].sum(-1).tolist() == [131, 205]
    assert torch.equal(batch.input_ids, inputs["input_ids"])
    assert torch.equal(batch.attention_mask, inputs["attention_mask"])
    media = batch.media["audio"]
    assert torch.equal(media["input_features"], inputs["input_features"])  # the whole 30 s window, padding too
    assert media["feature_attention_mask"].tolist() == inputs["feature_attention_mask"].tolist()


def test_logits_equal_transformers_at_real_positions(model, hf, inputs, batch):
    with torch.no_grad():
        theirs = hf(**inputs, position_ids=generation_positions(inputs["attention_mask"])).logits
        ours = model(batch.input_ids, batch.attention_mask, batch.media).dense()
    real = batch.attention_mask.bool()
    assert (ours[real] - theirs[real]).abs().max() <= 1e-5


def test_greedy_generation_with_the_kv_cache_equals_transformers(model, hf, inputs, batch):
    with torch.no_grad():
        theirs = hf.generate(**inputs, max_new_tokens=8, do_sample=False)[:, inputs["input_ids"].shape[1] :]
        ours = model.generate(batch.input_ids, batch.attention_mask, batch.media, max_new_tokens=8)
    assert torch.equal(ours, theirs)
    assert len(set(theirs[0].tolist())) > 2  # the tiny model's tokens vary: a real comparison


def test_token_counts_follow_transformers_formula_and_long_clips_are_cut_at_30_s(model, released):
    for frames in (1, 2, 3, 4, 5, 130, 131, 2997, 2998, 2999, 3000):
        expected = (((frames - 1) // 2 + 1) - 2) // 2 + 1  # Qwen2AudioProcessor's num_audio_tokens
        assert model.media_tokens("audio", (128, frames + 3)) == expected
    long = [np.concatenate([tone(20.0, 440.0), tone(15.0, 880.0)])]  # 35 s
    inputs = processor_inputs(released, long, PROMPTS[:1])
    batch = mmpost_batch(model, long, PROMPTS[:1])
    assert torch.equal(batch.input_ids, inputs["input_ids"])
    assert int((batch.input_ids == model.placeholder_ids["audio"]).sum()) == 750
    assert torch.equal(batch.media["audio"]["input_features"], inputs["input_features"])


def test_export_to_transformers_reloads_with_the_same_logits(model, batch, tmp_path):
    out = export(model, tmp_path / "hf", fmt="hf")  # checks the reload on its own probe clips
    report = read_report(out)
    assert report["layout"] == "Qwen2AudioForConditionalGeneration"
    assert report["reload"]["greedy_agreement"] == "4/4" and report["reload"]["media_diff"] == 0.0
    reloaded = AutoModelForMultimodalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded).__name__ == "Qwen2AudioForConditionalGeneration"
    inputs = processor_inputs(out)
    assert torch.equal(inputs["input_ids"], batch.input_ids)
    with torch.no_grad():
        theirs = reloaded(**inputs, position_ids=generation_positions(inputs["attention_mask"])).logits
        ours = model(batch.input_ids, batch.attention_mask, batch.media).dense()
    real = batch.attention_mask.bool()
    assert (ours[real] - theirs[real]).abs().max() <= 1e-4


def test_a_quantized_export_keeps_the_audio_parts_in_float_and_reloads_with_the_same_tokens(released, tmp_path):
    model = mmpost.from_pretrained(released).eval()  # its own copy: quantizing changes the model
    out = export(model, tmp_path / "q", fmt="hf", quantize="w4a16")
    ignored = AutoConfig.from_pretrained(out).quantization_config["ignore"]
    assert all(any(part in k for k in ignored) for part in ("audio_tower", "multi_modal_projector", "lm_head"))
    reloaded = AutoModelForMultimodalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.model.audio_tower.layers[0].fc1.weight.dtype == torch.float32
    inputs = processor_inputs(out)
    batch = mmpost_batch(model)
    with torch.no_grad():
        ours = model.generate(batch.input_ids, batch.attention_mask, batch.media, max_new_tokens=8)
        theirs = reloaded.generate(**inputs, max_new_tokens=8, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    assert torch.equal(ours, theirs)


def test_mmpost_format_keeps_the_imported_parts(model, batch, tmp_path):
    model.save(tmp_path / "m")
    again = mmpost.load(tmp_path / "m").eval()
    with torch.no_grad():
        before = model(batch.input_ids, batch.attention_mask, batch.media).dense()
        after = again(batch.input_ids, batch.attention_mask, batch.media).dense()
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def test_a_whisper_audio_model_exports_as_mmpost_and_is_told_why_not_qwen2_audio(llm_dir, tmp_path, one_thread):
    whisper = make_tiny_whisper(tmp_path / "whisper", d_model=32, layers=1, heads=4, max_source_positions=50)
    torch.manual_seed(0)
    model = mmpost.LMM(
        str(llm_dir), {"audio": mmpost.encoder("whisper", path=str(whisper))}, {"audio": mmpost.connector("mlp")}
    ).eval()
    with pytest.raises(ExportError, match="Qwen2AudioForConditionalGeneration: a Qwen2-Audio audio tower"):
        family_for(model)
    out = export(model, tmp_path / "mm", fmt="mmpost")
    assert read_report(out)["reload"]["greedy_agreement"] == "4/4"


def test_a_checkpoint_missing_a_tensor_is_refused_by_name(released, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(released, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["multi_modal_projector.linear.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"multi_modal_projector\.linear\.weight"):
        mmpost.from_pretrained(broken)
