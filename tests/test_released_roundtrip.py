"""A released VLM through mmpost and back: import (``from: hf:``), train (LoRA sft, dpo, grpo, resumed), swap parts
across released models, and export to the transformers class that fits, float and GPTQ-quantized."""

from __future__ import annotations

import pytest
import torch
import transformers
import yaml
from helpers import make_batch
from transformers import AutoModelForImageTextToText, AutoProcessor

import mmpost
import mmpost.training.loop
from mmpost.cli import main
from mmpost.config.schema import DataSourceConfig
from mmpost.data.sample import Sample
from mmpost.export import ExportError, export, read_report
from mmpost.synthetic.tiny_released import make_tiny_llava, make_tiny_qwen2_vl
from mmpost.training.metrics import read_metrics


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    return {"llava": make_tiny_llava(root / "llava"), "qwen2_vl": make_tiny_qwen2_vl(root / "qwen2_vl")}


def write_config(tmp_path, synth_dir, name: str, source: str, stage, data: str, **sections) -> str:
    images = str(synth_dir / "images")
    cfg = {
        "stage": stage,
        "out": str(tmp_path / name),
        "from": source,
        "model": {"lora": {"r": 8}},
        "data": {"train": {"path": str(synth_dir / data), "image_root": images}, "max_length": 256, "num_workers": 0},
        "train": {"lr": 3e-3, "batch_size": 4, "max_steps": 10, "log_every": 1, "warmup_ratio": 0.0},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def probe_batch(model, synth_dir, kind: str = "prompt"):
    image = (synth_dir / "images" / "heldout" / "000001.png").read_bytes()
    samples = [
        Sample(id=str(i), messages=[{"role": "user", "content": "<image>\n" + q}], media={"image": [image]})
        for i, q in enumerate(["What colour is the shape?", "How many shapes are there?"])
    ]
    return make_batch(model, samples, kind)


def transformers_inputs(out, batch):
    """The exported model's own inputs for mmpost's prompt batch (the export check proved the processor gives
    these ids and pixels)."""
    media = batch.media["image"]
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if isinstance(media, dict):  # Qwen2-VL
        image_id = AutoProcessor.from_pretrained(out).image_token_id
        inputs |= {
            "pixel_values": media["pixel_values"],
            "image_grid_thw": media["grid_thw"],
            "mm_token_type_ids": (batch.input_ids == image_id).int(),
        }
    else:
        inputs["pixel_values"] = media
    return inputs


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_import_lora_sft_export_reloads_in_transformers_with_the_same_logits(family, checkpoints, tmp_path, synth_dir):
    cfg = write_config(tmp_path, synth_dir, "sft", f"hf:{checkpoints[family]}", "sft", "sft.json")
    assert main(["train", cfg]) == 0
    losses = [r["loss"] for r in read_metrics(tmp_path / "sft") if "loss" in r]
    assert len(losses) == 10 and losses[-1] < losses[0]
    assert main(["export", str(tmp_path / "sft"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    report = read_report(tmp_path / "hf")
    expected = {"llava": "LlavaForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration"}[family]
    assert report["layout"] == expected and report["reload"]["greedy_agreement"] == "4/4"

    model = mmpost.load(tmp_path / "sft" / "final").eval()
    assert model.has_lora
    hf = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == expected
    batch = probe_batch(model, synth_dir)
    real = batch.attention_mask.bool()
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0) if family == "llava" else None
    with torch.no_grad():
        ours = model(batch.input_ids, batch.attention_mask, batch.media).dense()
        theirs = hf(**transformers_inputs(tmp_path / "hf", batch), position_ids=position_ids).logits
    assert (ours[real] - theirs[real]).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_gptq_export_reloads_in_transformers_with_the_quantized_models_greedy_tokens(
    family, checkpoints, tmp_path, synth_dir
):
    model = mmpost.from_pretrained(str(checkpoints[family])).eval()
    calib = DataSourceConfig(path=str(synth_dir / "sft.json"), image_root=str(synth_dir / "images"))
    out = export(model, tmp_path / "q", fmt="hf", quantize="w4a16-gptq", calib=calib)
    report = read_report(out)
    assert report["quantization"]["scheme"].startswith("int4") and report["size"]["quantized_layer_ratio"] < 0.35
    config = transformers.AutoConfig.from_pretrained(out)
    ignored = config.quantization_config["ignore"]
    assert any("lm_head" in k for k in ignored)  # the head, tower and connector stay in float
    hf = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    batch = probe_batch(model, synth_dir)
    with torch.no_grad():  # `model` is the quantized one now
        ours = model.generate(batch.input_ids, batch.attention_mask, batch.media, max_new_tokens=6)
        inputs = transformers_inputs(out, batch)
        theirs = hf.generate(**inputs, max_new_tokens=6, do_sample=False)[:, batch.input_ids.shape[1] :]
    assert torch.equal(ours, theirs)


STAGES = {
    "dpo": ({"name": "dpo", "beta": 0.1}, "pairs.json"),
    "grpo": (
        {"name": "grpo", "rewards": [{"name": "accuracy", "weight": 1.0}], "group_size": 4, "beta": 0.04},
        "count.json",
    ),
}


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("stage", ["dpo", "grpo"])
def test_preference_and_rl_stages_run_and_resume_on_an_imported_model(
    stage, family, checkpoints, tmp_path, synth_dir, monkeypatch
):
    options, data = STAGES[stage]
    cfg = write_config(
        tmp_path, synth_dir, "run", f"hf:{checkpoints[family]}", options, data, train={"max_steps": 4, "save_every": 2}
    )
    original = mmpost.training.loop.save_checkpoint

    def crash(*args, **kwargs):
        path = original(*args, **kwargs)
        if path.name == "step-2":
            raise KeyboardInterrupt("simulated crash")
        return path

    monkeypatch.setattr(mmpost.training.loop, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        main(["train", cfg])
    monkeypatch.setattr(mmpost.training.loop, "save_checkpoint", original)
    assert main(["train", cfg, "--resume"]) == 0
    steps = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [s for s, _ in steps] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in steps)
    assert (tmp_path / "run" / "final" / "mmpost.json").is_file()


def test_a_released_tower_and_merger_before_another_llm_train_and_export_as_they_fit(
    checkpoints, tmp_path, synth_dir, llm_dir
):
    swap = {"llm": {"path": str(llm_dir)}, "connectors": {"image": {"name": "patch_merger"}}}
    align = write_config(
        tmp_path, synth_dir, "align", f"hf:{checkpoints['qwen2_vl']}", "align", "align.json", model=swap
    )
    assert main(["train", align]) == 0
    sft = write_config(tmp_path, synth_dir, "sft", str(tmp_path / "align"), "sft", "sft.json")
    assert main(["train", sft]) == 0
    model = mmpost.load(tmp_path / "sft" / "final").eval()
    assert type(model.base_llm).__name__ == "LlamaForCausalLM" and model.positions is None
    assert type(model.encoders["image"]).__name__ == "QwenVisionEncoder"
    with pytest.raises(ExportError, match=r"(?s)Qwen2VLForConditionalGeneration.*own text model.*--format mmpost"):
        export(model, tmp_path / "hf", fmt="hf")
    out = export(model, tmp_path / "mm", fmt="mmpost")
    assert read_report(out)["reload"]["greedy_agreement"] == "4/4"


def test_another_llm_under_a_released_llava_exports_to_llava(checkpoints, tmp_path, synth_dir, qwen_dir):
    cfg = write_config(
        tmp_path,
        synth_dir,
        "sft",
        f"hf:{checkpoints['llava']}",
        "sft",
        "sft.json",
        model={"llm": {"path": str(qwen_dir)}, "lora": {"r": 0}},
        train={"max_steps": 4},
    )
    assert main(["train", cfg]) == 0
    out = export(tmp_path / "sft", tmp_path / "hf", fmt="hf")
    assert read_report(out)["layout"] == "LlavaForConditionalGeneration"
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.text_config.model_type == "qwen2" and config.vision_config.model_type == "clip_vision_model"


def test_a_released_checkpoint_re_exports_quantized_and_answers_from_the_command_line(
    checkpoints, tmp_path, synth_dir, capsys
):
    source = f"hf:{checkpoints['qwen2_vl']}"
    out = tmp_path / "w8"
    assert main(["export", source, "--format", "hf", "--quantize", "w8a16", "--out", str(out)]) == 0
    report = read_report(out)
    assert report["layout"] == "Qwen2VLForConditionalGeneration" and report["reload"]["greedy_agreement"] == "4/4"
    image = synth_dir / "images" / "heldout" / "000001.png"
    capsys.readouterr()
    assert main(["generate", source, "--image", str(image), "--prompt", "What colour is it?"]) == 0
    assert capsys.readouterr().out.strip()
