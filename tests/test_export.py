"""Exports reload in transformers (LLaVA layout) and mmpost with the source model's logits and tokens."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import mmpost
from mmpost.cli import main
from mmpost.config.schema import LoraConfig
from mmpost.export import ExportError, export
from mmpost.export.check import PROBE_PROMPTS, probes
from mmpost.generate import answer


def randomize(model: mmpost.LMM, seed: int = 0) -> mmpost.LMM:
    """Spreads the tiny model's weights so logits differ clearly between tokens (a sharper parity test)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.connectors.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def transformers_logits(out, model, image: Image.Image, prompt: str):
    processor = AutoProcessor.from_pretrained(out)
    hf = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    text = model.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\n" + prompt}], tokenize=False, add_generation_prompt=True
    )
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    with torch.no_grad():
        logits = hf(**inputs).logits
        tokens = hf.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    return logits, tokens, inputs


@pytest.mark.parametrize("tower, connector", [("clip", "mlp"), ("siglip", "linear")])
def test_hf_export_matches_mmpost_logits_and_greedy_tokens(
    tower, connector, llm_dir, qwen_dir, clip_dir, siglip_dir, synth_dir, tmp_path
):
    llm, tower_dir = (llm_dir, clip_dir) if tower == "clip" else (qwen_dir, siglip_dir)
    model = randomize(
        mmpost.LMM(
            llm=str(llm),
            encoders={"image": mmpost.encoder("hf_vision", path=str(tower_dir))},
            connectors={"image": mmpost.connector(connector)},
        )
    )
    out = export(model, tmp_path / "hf", fmt="hf")
    image_path = synth_dir / "images" / "heldout" / "000002.png"
    image = Image.open(image_path).convert("RGB")
    logits, tokens, inputs = transformers_logits(out, model, image, "What shape is it?")
    with torch.no_grad():
        ours = model(inputs["input_ids"], inputs["attention_mask"], {"image": inputs["pixel_values"]}).dense()
        our_tokens = model.generate(
            inputs["input_ids"], inputs["attention_mask"], {"image": inputs["pixel_values"]}, max_new_tokens=6
        )[0]
    assert (ours - logits).abs().max() <= 1e-4
    assert torch.equal(our_tokens, tokens)
    # mmpost's own pipeline (its preprocessing and tokenisation) answers as transformers does
    assert (
        answer(model, "What shape is it?", images=[image_path], max_new_tokens=6)
        == model.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    )


def test_hf_export_processor_takes_typed_content_as_string_content(make_model, tmp_path):
    model = make_model("mlp", depth=2).eval()
    out = export(model, tmp_path / "hf", fmt="hf")
    processor = AutoProcessor.from_pretrained(out)
    prompt = PROBE_PROMPTS[1]
    typed = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        {"role": "user", "content": [{"type": "text", "text": "And the "}, {"type": "text", "text": "shape?"}]},
    ]
    plain = [
        {"role": "user", "content": "<image>\n" + prompt},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "And the shape?"},
    ]

    def render(template_of, messages):
        return template_of.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    assert render(processor, typed) == render(processor, plain) == render(model.tokenizer, plain)
    text = render(processor, typed[:1])
    assert text == render(model.tokenizer, plain[:1])  # string content renders as before
    probe = probes(model, count=2)[1]  # mmpost's own tokenisation of the same prompt and an image
    assert probe.prompt == prompt
    inputs = processor(images=[probe.image], text=[text], return_tensors="pt")
    assert torch.equal(inputs["input_ids"], probe.batch.input_ids)


def test_export_refuses_a_non_empty_out_and_parts_llava_cannot_hold(make_model, tmp_path):
    model = make_model("mlp", depth=3).eval()
    with pytest.raises(ExportError, match=r"(?s)linear or 2-layer mlp.*MLPConnector of depth 3.*--format mmpost"):
        export(model, tmp_path / "deep", fmt="hf")
    assert not (tmp_path / "deep").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty; pass --force"):
        export(model, tmp_path / "full", fmt="mmpost")
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    export(model, tmp_path / "full", fmt="mmpost", force=True)
    assert mmpost.load(tmp_path / "full").connectors["image"].depth == 3


def test_cli_exports_a_lora_model_merged(llm_dir, clip_dir, tmp_path, capsys):
    model = mmpost.LMM(
        llm=str(llm_dir),
        encoders={"image": mmpost.encoder("hf_vision", path=str(clip_dir))},
        connectors={"image": mmpost.connector("mlp")},
        lora=LoraConfig(r=4, dropout=0.0),
    )
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.save(tmp_path / "src")
    assert main(["export", str(tmp_path / "src"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert main(["export", str(tmp_path / "src"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "not empty; pass --force" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "src"), "--format", "mmpost", "--out", str(tmp_path / "mm")]) == 0
    assert not mmpost.load(tmp_path / "mm").has_lora
