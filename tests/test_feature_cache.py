"""Cached features of frozen encoders (``data.cache_features``): computed once, the losses of an uncached run, no
image decoded after the cache is filled, another encoder or preprocessing in another folder."""

from __future__ import annotations

import pytest

import mmpost.data.media
from mmpost.cli import main
from mmpost.training.metrics import read_metrics


@pytest.fixture
def decodes(monkeypatch):
    """Counts image decodes in this process (the runs use no data workers)."""
    calls = {"n": 0}
    decode = mmpost.data.media.DECODERS["image"]

    def counted(ref):
        calls["n"] += 1
        return decode(ref)

    monkeypatch.setitem(mmpost.data.media.DECODERS, "image", counted)
    return calls


def losses(path):
    return [r["loss"] for r in read_metrics(path) if "loss" in r]


def test_two_cached_epochs_give_the_uncached_losses_and_decode_each_image_once(run_config, tmp_path, decodes):
    train = {"max_steps": 0, "epochs": 2, "batch_size": 32}
    assert main(["train", str(run_config("plain", train=train, data={"eval": None}))]) == 0
    plain_decodes, decodes["n"] = decodes["n"], 0
    cache = tmp_path / "cache"
    cfg = run_config("cached", train=train, data={"cache_features": str(cache), "eval": None})
    assert main(["train", str(cfg)]) == 0
    images = 96  # the synthetic align set: one image per sample
    assert plain_decodes == 2 * images and decodes["n"] == images  # the cached run decodes only to fill the cache
    assert losses(tmp_path / "cached") == pytest.approx(losses(tmp_path / "plain"), abs=1e-5)
    assert len(list(cache.glob("image/*/*.npy"))) == images

    decodes["n"] = 0  # a later run with the same encoder reads the same folder and decodes nothing
    again = run_config("again", train=train, data={"cache_features": str(cache), "eval": None})
    assert main(["train", str(again)]) == 0
    assert decodes["n"] == 0 and losses(tmp_path / "again") == pytest.approx(losses(tmp_path / "cached"), abs=1e-6)


def test_another_feature_layer_gets_another_cache_folder(run_config, tmp_path, clip_dir):
    cache = tmp_path / "cache"
    train = {"max_steps": 2, "batch_size": 8}
    assert main(["train", str(run_config("a", train=train, data={"cache_features": str(cache)}))]) == 0
    model = {"encoders": {"image": {"name": "hf_vision", "path": str(clip_dir), "feature_layer": -1}}}
    assert main(["train", str(run_config("b", train=train, model=model, data={"cache_features": str(cache)}))]) == 0
    assert len(list((cache / "image").iterdir())) == 2


def test_a_training_encoder_is_refused(run_config, tmp_path, capsys):
    cfg = run_config(
        "trains",
        stage="sft",
        train={"trainable": ["connectors", "encoders"], "max_steps": 1},
        data={"cache_features": str(tmp_path / "cache")},
    )
    assert main(["train", str(cfg)]) == 2
    assert "data.cache_features: an encoder trains in this stage" in capsys.readouterr().err
