"""The quantize pass on whole LMMs, and quantized exports that transformers and mmpost reload."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import mmpost
from mmpost.cli import main
from mmpost.config.schema import DataSourceConfig, LoraConfig
from mmpost.export import export, read_report
from mmpost.generate import answer
from mmpost.model.quantized import WeightScheme, selected_linears
from mmpost.quant import QuantizeOptions, load_options, quantize
from mmpost.quant.calibrate import calibration_batches
from mmpost.quant.methods import rtn


def calib_source(synth_dir) -> DataSourceConfig:
    return DataSourceConfig(path=str(synth_dir / "sft.json"), image_root=str(synth_dir / "images"))


def spread(model: mmpost.LMM, seed: int = 0) -> mmpost.LMM:
    """Random weights of a realistic spread, so that quantization error and greedy tokens are not trivial."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.connectors.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def gptq_options(**kw) -> QuantizeOptions:
    return QuantizeOptions(**{"bits": 4, "group_size": 32, "method": "gptq", "num_samples": 16, **kw})


def test_rtn_quantizes_only_the_llms_linear_layers(make_model):
    model = spread(make_model("mlp"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scheme = WeightScheme(bits=8, group_size=None)
    report = quantize(model, QuantizeOptions(bits=8, group_size=None, method="rtn"))
    names = set(selected_linears(model.base_llm, ["lm_head"]))
    assert report.layers == len(names) == 2 * 7  # q k v o gate up down per layer
    for name, module in model.base_llm.named_modules():
        if name in names:
            original = before[f"llm.{name}.weight"]
            assert torch.equal(module.weight, rtn(original, scheme).weight)
            assert not torch.equal(module.weight, original)
    untouched = [k for k in before if not any(k == f"llm.{n}.weight" for n in names)]
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in untouched)  # encoders, connectors, embeddings
    assert model.quantization.describe().startswith("int8 sym per-channel")


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scales_are_those_the_checkpoint_can_store(make_model, calib, method, dtype):
    # the checkpoint keeps the scales in the layers' dtype: a bf16 model's are rounded to bf16 before any weight is
    # quantized with them; a float32 model keeps compressed-tensors' own scales (rounding them costs accuracy)
    model = spread(make_model("mlp")).to(dtype)
    options = QuantizeOptions(bits=4, group_size=32, method=method, num_samples=8)
    quantize(model, options, calib if method == "gptq" else None)
    scales = torch.cat([scale.flatten() for scale, _ in model.quantization.layers.values()])
    assert scales.dtype == torch.float32 and torch.equal(scales.to(dtype).float(), scales)
    if dtype == torch.float32:
        assert not torch.equal(scales.bfloat16().float(), scales)


def test_multimodal_calibration_feeds_media_tokens_to_every_quantized_layer(make_model, calib):
    model = spread(make_model("mlp"))
    batches = calibration_batches(model, calib, 16, 8, 1024)
    image_id = model.placeholder_ids["image"]
    media_tokens = sum(int((b.input_ids == image_id).sum()) for b in batches)
    assert media_tokens == 16 * model.media_tokens("image", tuple(batches[0].media["image"].shape[1:]))
    report = quantize(model, gptq_options(), calib)
    assert set(report.media_rows_by_layer) == set(model.quantization.layers)
    assert all(rows == media_tokens for rows in report.media_rows_by_layer.values())
    # GPTQ's error on each layer's own calibration inputs is below round-to-nearest's on the same inputs
    assert all(e["final"] < e["rtn"] for e in report.errors.values())

    text = spread(make_model("mlp"))
    text_report = quantize(text, gptq_options(calibration="text"), calib)
    assert text_report.media_rows == 0 and all(r == 0 for r in text_report.media_rows_by_layer.values())
    # the same text, without the media tokens and the line break after each placeholder
    assert report.rows - media_tokens - 16 <= text_report.rows < report.rows - media_tokens
    layer = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(model.quantization.layers[layer][0], text.quantization.layers[layer][0])


def test_calibration_without_media_warns_what_it_means(make_model, calib, caplog):
    from mmpost.quant.calibrate import text_only

    model = spread(make_model("mlp"))
    with caplog.at_level(logging.WARNING, logger="mmpost"):
        quantize(model, gptq_options(), [text_only(s) for s in calib])
    assert "no calibration sample has media" in caplog.text
    assert "never sees the media tokens" in caplog.text


def test_bad_input_is_refused_before_any_work(make_model, calib, tmp_path):
    model = spread(make_model("mlp"))
    with pytest.raises(
        ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: group size 48 does not divide its input width 64"
    ):
        quantize(model, QuantizeOptions(group_size=48, method="rtn"))
    assert model.quantization is None
    with pytest.raises(ValueError, match="gptq needs calibration samples"):
        quantize(model, QuantizeOptions(method="gptq"))
    with pytest.raises(ValueError, match="shares its weights with the input embeddings"):
        quantize(model, QuantizeOptions(method="rtn", ignore=[]))
    quantize(model, QuantizeOptions(method="rtn"))
    with pytest.raises(ValueError, match=r"already quantized \(int4 sym g64 \(rtn"):
        quantize(model, QuantizeOptions(method="rtn"))
    model.save(tmp_path / "q")
    with pytest.raises(ValueError, match="already quantized"):
        quantize(mmpost.load(tmp_path / "q"), QuantizeOptions(method="rtn"))
    with pytest.raises(ValueError, match="use a preset"):
        load_options("w3a16")


def test_quantized_llava_export_loads_in_transformers_with_the_same_greedy_tokens(
    llm_dir, clip_dir, synth_dir, calib, tmp_path
):
    model = spread(
        mmpost.LMM(
            llm=str(llm_dir),
            encoders={"image": mmpost.encoder("hf_vision", path=str(clip_dir))},
            connectors={"image": mmpost.connector("mlp")},
        )
    )
    options = load_options("w4a16-gptq", group_size=32, num_samples=16)
    out = export(model, tmp_path / "hf", fmt="hf", quantize=options, calib=calib_source(synth_dir))
    report = read_report(out)
    assert report["reload"]["max_abs_logit_diff"] == 0.0 and report["reload"]["greedy_agreement"] == "4/4"
    assert report["size"]["quantized_layer_ratio"] <= 0.35
    assert report["quantization"]["media_rows"] > 0
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["config_groups"]["group_0"]["weights"]["num_bits"] == 4

    image = Image.open(synth_dir / "images" / "heldout" / "000003.png").convert("RGB")
    processor = AutoProcessor.from_pretrained(out)
    hf = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    text = model.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nHow many shapes are there?"}], tokenize=False, add_generation_prompt=True
    )
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    with torch.no_grad():
        theirs = hf.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1] :]
        ours = model.generate(inputs["input_ids"], inputs["attention_mask"], {"image": inputs["pixel_values"]}, 8)[0]
        q_proj = hf.model.language_model.layers[0].self_attn.q_proj.weight
    assert torch.equal(ours, theirs)
    # transformers computes with the dequantized integers, exactly mmpost's quantized weights
    assert torch.equal(q_proj, model.base_llm.model.layers[0].self_attn.q_proj.weight)


@pytest.mark.parametrize("connector, kwargs", [("qformer", {"num_queries": 4}), ("xattn", {"every": 1})])
def test_parts_without_a_llava_layout_export_quantized_in_mmpost_format_and_serve(
    connector, kwargs, make_model, synth_dir, calib, tmp_path
):
    model = spread(make_model(connector, **kwargs))
    out = export(model, tmp_path / "q", fmt="mmpost", quantize=gptq_options(), calib=calib_source(synth_dir))
    report = read_report(out)
    assert report["reload"]["greedy_agreement"] == "4/4" and report["reload"]["max_abs_logit_diff"] == 0.0
    reloaded = mmpost.load(out)
    assert reloaded.quantization is not None and reloaded.quantization.describe().startswith("int4 sym g32")
    image = synth_dir / "images" / "heldout" / "000001.png"
    expected = answer(model, "What shape is it?", images=[image], max_new_tokens=5)
    assert answer(str(out), "What shape is it?", images=[image], max_new_tokens=5) == expected


def test_export_merges_lora_before_quantizing(llm_dir, clip_dir, tmp_path):
    def build(lora: LoraConfig | None):
        torch.manual_seed(0)
        return mmpost.LMM(
            llm=str(llm_dir),
            encoders={"image": mmpost.encoder("hf_vision", path=str(clip_dir))},
            connectors={"image": mmpost.connector("mlp")},
            lora=lora,
        )

    adapted = build(LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in adapted.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    merged = build(None)
    merged.llm.load_state_dict(_merged_state(adapted))
    export(adapted.eval(), tmp_path / "a", quantize="w8a16")
    quantize(merged.eval(), load_options("w8a16"))
    reloaded = mmpost.load(tmp_path / "a")
    assert not reloaded.has_lora
    for name, (scale, _) in merged.quantization.layers.items():
        assert torch.equal(reloaded.quantization.layers[name][0], scale.to(reloaded.quantization.layers[name][0].dtype))


def _merged_state(model: mmpost.LMM) -> dict[str, torch.Tensor]:
    from mmpost.model.format import base_llm_state_dict

    return base_llm_state_dict(model, merge_lora=True)


def test_cli_export_quantized_prints_the_report(make_model, tmp_path, capsys):
    model = spread(make_model("mlp"))
    model.save(tmp_path / "model")
    assert main(["export", str(tmp_path / "model"), "--quantize", "w8a16", "--out", str(tmp_path / "q")]) == 0
    printed = capsys.readouterr().out
    assert "greedy agreement 4/4" in printed and "quantized 14 layers, int8 sym per-channel" in printed
    assert main(["export", str(tmp_path / "model"), "--quantize", "w4a16-gptq", "--out", str(tmp_path / "g")]) == 2
    assert "gptq needs calibration samples: pass --calib" in capsys.readouterr().err
