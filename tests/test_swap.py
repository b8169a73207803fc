"""Swapping a connector or the encoder family of a saved model, then training on: the LLM stays as it was."""

from __future__ import annotations

import pytest
import torch
import yaml
from helpers import make_batch

import mmpost
from mmpost.cli import main
from mmpost.connectors import CONNECTORS
from mmpost.data.sources import read_records
from mmpost.losses.ce import cross_entropy_sum
from mmpost.synthetic.tiny_vision import make_tiny_open_clip, make_tiny_timm
from mmpost.training.metrics import read_metrics


def llm_weights(model: mmpost.LMM) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.llm.state_dict().items()}


def test_swapped_encoder_family_and_connector_train_with_the_llm_untouched(make_model, run_config, tmp_path):
    source = make_model("mlp")
    source.save(tmp_path / "source")
    before = llm_weights(source)
    name, kwargs, weights = make_tiny_timm(tmp_path / "timm")
    cfg = run_config("swapped", train={"max_steps": 6})
    data = yaml.safe_load(cfg.read_text())
    data["from"] = str(tmp_path / "source")
    data["model"] = {
        "encoders": {"image": {"name": "timm", "model": name, "model_kwargs": kwargs, "weights": str(weights)}},
        "connectors": {"image": {"name": "linear"}},
    }
    cfg.write_text(yaml.safe_dump(data))
    assert main(["train", str(cfg)]) == 0
    trained = mmpost.load(tmp_path / "swapped" / "final")
    assert type(trained.encoders["image"]).__name__ == "TimmEncoder"
    assert type(trained.connectors["image"]).__name__ == "LinearConnector"
    assert all(torch.equal(v, trained.llm.state_dict()[k]) for k, v in before.items())
    losses = [r["loss"] for r in read_metrics(tmp_path / "swapped") if "loss" in r]
    assert losses[-1] < losses[0]


def test_python_swap_to_open_clip_then_steps_keep_the_llm(make_model, tmp_path, synth_dir):
    model = make_model("mlp")
    before = llm_weights(model)
    model_cfg, weights = make_tiny_open_clip(tmp_path / "oc")
    model.set_encoder("image", mmpost.encoder("open_clip", arch="tiny", model_cfg=model_cfg, weights=str(weights)))
    model.set_connector("image", mmpost.connector("mlp", depth=2))
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.connectors.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.connectors.parameters(), lr=1e-2)
    batch = make_batch(model, read_records(synth_dir / "align.json", image_root=synth_dir / "images")[:8])
    losses = []
    for _ in range(5):
        out = model(batch.input_ids, batch.attention_mask, batch.media, labels=batch.labels)
        loss = cross_entropy_sum(out.logits, out.targets) / out.targets.numel()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, model.llm.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize(
    "connector",
    [
        {"name": "qformer", "num_queries": 4, "hidden_size": 32, "layers": 1, "heads": 4},
        {"name": "resampler", "num_latents": 4, "layers": 1, "heads": 4},
        {"name": "xattn", "every": 1, "heads": 4, "num_latents": 4, "resampler_layers": 1, "resampler_heads": 4},
    ],
    ids=lambda c: c["name"],
)
def test_trained_model_gets_a_new_connector_kind_and_trains_on_with_the_llm_frozen(run_config, tmp_path, connector):
    assert main(["train", str(run_config("first", train={"max_steps": 4}))]) == 0
    first = mmpost.load(tmp_path / "first" / "final")
    before = llm_weights(first)
    cfg = run_config("second", train={"max_steps": 6})
    data = yaml.safe_load(cfg.read_text())
    data["from"] = str(tmp_path / "first")
    data["model"] = {"connectors": {"image": connector}}
    cfg.write_text(yaml.safe_dump(data))
    assert main(["train", str(cfg)]) == 0
    second = mmpost.load(tmp_path / "second" / "final")
    assert CONNECTORS.name_of(type(second.connectors["image"])) == connector["name"]
    assert all(torch.equal(v, second.llm.state_dict()[k]) for k, v in before.items())
    losses = [r["loss"] for r in read_metrics(tmp_path / "second") if "loss" in r]
    assert losses[-1] < losses[0]
