"""Audio and image+audio models: every audio encoder with every connector kind, mixed batches, adding
a modality to a trained model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from helpers import greedy_without_cache, make_batch

import mmpost
from mmpost.cli import main
from mmpost.data.sources import read_records
from mmpost.generate import answer
from mmpost.losses.ce import cross_entropy_sum
from mmpost.synthetic.tiny_audio import make_tiny_speech, make_tiny_whisper
from mmpost.synthetic.write import synthesize
from mmpost.training.metrics import read_metrics

CONNECTORS = {
    "mlp": {"name": "mlp", "depth": 2},
    "qformer": {"name": "qformer", "num_queries": 4, "hidden_size": 32, "layers": 1, "heads": 4},
    "xattn": {"name": "xattn", "every": 1, "heads": 4, "num_latents": 4, "resampler_layers": 1, "resampler_heads": 4},
}


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("media")
    synthesize(out, num_train=24, num_heldout=6, shard_size=12, modalities=("image", "audio"), progress=False)
    return out


@pytest.fixture(scope="module")
def audio_encoders(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("audio_encoders")
    whisper = make_tiny_whisper(root / "whisper", d_model=32, layers=1, heads=4, max_source_positions=50)
    specs = {"whisper": {"name": "whisper", "path": str(whisper)}}
    for kind in ("wav2vec2", "hubert"):
        path, config = make_tiny_speech(root / f"{kind}.safetensors", kind=kind)
        specs[kind] = {"name": kind, "path": str(path), "config": config}
    return specs


def audio_model(llm_dir, spec: dict, connector: dict, seed: int = 0) -> mmpost.LMM:
    torch.manual_seed(seed)
    encoder = mmpost.encoder(**spec)
    model = mmpost.LMM(str(llm_dir), {"audio": encoder}, {"audio": mmpost.connector(**connector)}).eval()
    if connector["name"] == "xattn":
        for block in model.connectors["audio"].blocks.values():
            block.attn_gate.data.fill_(0.7)
            block.ff_gate.data.fill_(0.7)
    return model


@pytest.mark.parametrize("connector", list(CONNECTORS))
@pytest.mark.parametrize("encoder", ["whisper", "wav2vec2", "hubert"])
def test_audio_models_save_load_and_generate_with_the_kv_cache(
    llm_dir, media_dir, audio_encoders, tmp_path, encoder, connector
):
    model = audio_model(llm_dir, audio_encoders[encoder], CONNECTORS[connector])
    model.base_llm.generation_config.eos_token_id = None
    questions = read_records(media_dir / "audio_heldout.jsonl")[:3]  # clips of different lengths
    batch = make_batch(model, questions, kind="reference")
    assert len(set(batch.media["audio"]["lengths"].tolist())) > 1
    args = (batch.input_ids, batch.attention_mask, batch.media)
    cached = model.generate(*args, max_new_tokens=4)
    assert torch.equal(cached, greedy_without_cache(model, batch, 4))
    before = model(*args).dense()
    model.save(tmp_path / "m")
    after = mmpost.load(tmp_path / "m").eval()(*args).dense()
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    if encoder == "whisper" and connector == "xattn":  # the command-line path serves audio models too
        clip = questions[0].media["audio"][0]
        assert isinstance(answer(tmp_path / "m", "How many beeps?", audios=[clip], max_new_tokens=3), str)


def test_per_frame_connector_gives_each_clip_its_own_token_count(llm_dir, media_dir, audio_encoders):
    model = audio_model(llm_dir, audio_encoders["whisper"], CONNECTORS["mlp"])
    samples = read_records(media_dir / "audio_heldout.jsonl")[:4]
    batch = make_batch(model, samples)
    placeholders = (batch.input_ids == model.placeholder_ids["audio"]).sum(1)
    encoder = model.encoders["audio"]
    mask = encoder(batch.media["audio"]).mask
    assert placeholders.tolist() == mask.sum(1).tolist()  # padded frames are not spliced in
    assert len(set(placeholders.tolist())) > 1
    # and a clip's logits do not depend on the longer clips batched with it
    together = model(batch.input_ids, batch.attention_mask, batch.media).dense()
    one = make_batch(model, samples[:1])
    alone = model(one.input_ids, one.attention_mask, one.media).dense()[0]
    torch.testing.assert_close(together[0, : alone.shape[0]], alone, rtol=1e-4, atol=1e-4)


def test_image_and_audio_in_one_model_train_and_reload(llm_dir, clip_dir, media_dir, audio_encoders, tmp_path):
    torch.manual_seed(0)
    model = mmpost.LMM(
        str(llm_dir),
        encoders={
            "image": mmpost.encoder("hf_vision", path=str(clip_dir)),
            "audio": mmpost.encoder(**audio_encoders["whisper"]),
        },
        connectors={"image": mmpost.connector("mlp"), "audio": mmpost.connector(**CONNECTORS["qformer"])},
    )
    samples = read_records(media_dir / "mixed_sft.json")[:6]
    batch = make_batch(model, samples)
    assert set(batch.media) == {"image", "audio"}
    optimizer = torch.optim.AdamW(model.connectors.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        out = model(batch.input_ids, batch.attention_mask, batch.media, labels=batch.labels)
        loss = cross_entropy_sum(out.logits, out.targets) / out.targets.numel()
        loss.backward()
        assert all(p.grad is not None for p in model.connectors.parameters() if p.requires_grad)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1
    model.eval().save(tmp_path / "mixed")
    args = (batch.input_ids, batch.attention_mask, batch.media)
    before = model(*args).dense()
    after = mmpost.load(tmp_path / "mixed").eval()(*args).dense()
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def test_adding_audio_to_a_trained_image_model_keeps_its_other_weights(
    make_model, run_config, media_dir, audio_encoders, tmp_path
):
    source = make_model("mlp")
    source.save(tmp_path / "source")
    kept = {k: v.clone() for k, v in source.state_dict().items()}
    cfg = run_config("with-audio", train={"max_steps": 6, "lr": 3e-3})
    data = yaml.safe_load(cfg.read_text())
    data["from"] = str(tmp_path / "source")
    data["model"] = {
        "encoders": {"audio": {"name": "whisper", "path": audio_encoders["whisper"]["path"]}},
        "connectors": {"audio": CONNECTORS["xattn"]},
    }
    data["data"] = {"train": {"path": str(media_dir / "audio_align.json")}, "max_length": 256, "num_workers": 0}
    data.pop("eval", None)
    cfg.write_text(yaml.safe_dump(data))
    assert main(["train", str(cfg)]) == 0
    trained = mmpost.load(tmp_path / "with-audio" / "final")
    state = trained.state_dict()
    assert set(trained.modalities) == {"image", "audio"}
    assert all(torch.equal(v, state[k]) for k, v in kept.items())  # LLM, image encoder and connector
    losses = [r["loss"] for r in read_metrics(tmp_path / "with-audio") if "loss" in r]
    assert losses[-1] < losses[0]
