"""Shared fixtures: tiny models and data built locally and loaded through the real loading code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import write_run_config

import mmpost
from mmpost.synthetic.tiny_llm import make_tiny_llm, make_tiny_tokenizer
from mmpost.synthetic.tiny_vision import make_tiny_clip, make_tiny_siglip
from mmpost.synthetic.write import synthesize


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def quiet():
    from mmpost.cli import quiet_libraries

    quiet_libraries()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine waiting for them costs
    ~0.5 s a call."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, num_train=96, num_heldout=30, image_size=64, shard_size=32, progress=False)
    return out


@pytest.fixture(scope="session")
def llm_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("llm")
    return make_tiny_llm(out, make_tiny_tokenizer(out), hidden_size=64, layers=2, heads=4, kv_heads=2)


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qwen")
    return make_tiny_llm(out, make_tiny_tokenizer(out), arch="qwen2", hidden_size=64, layers=2, heads=4, kv_heads=2)


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("clip"), image_size=32, patch_size=8, hidden_size=32)


@pytest.fixture(scope="session")
def siglip_dir(tmp_path_factory) -> Path:
    return make_tiny_siglip(tmp_path_factory.mktemp("siglip"), image_size=32, patch_size=8, hidden_size=32)


@pytest.fixture
def make_model(llm_dir, clip_dir):
    """Builds an LMM with a tiny CLIP tower and the given connector."""

    def build(connector: str = "mlp", seed: int = 0, **kwargs) -> mmpost.LMM:
        torch.manual_seed(seed)
        return mmpost.LMM(
            llm=str(llm_dir),
            encoders={"image": mmpost.encoder("hf_vision", path=str(clip_dir), feature_layer=-2)},
            connectors={"image": mmpost.connector(connector, **kwargs)},
        )

    return build


@pytest.fixture
def run_config(tmp_path, synth_dir, llm_dir, clip_dir):
    """Writes a tiny run config (align on captions by default) and returns its path; kwargs override keys."""

    def write(name: str = "run", **sections: Any) -> Path:
        return write_run_config(tmp_path, synth_dir, llm_dir, clip_dir, name, **sections)

    return write


@pytest.fixture
def after_sft(run_config, tmp_path, synth_dir):
    """Runs a short sft run, then writes configs of a later stage that starts ``from:`` it.

    ``write(name, stage, defaults, **sections)``: ``defaults`` holds the stage's own ``data`` (file names
    under the synthetic data set, with any extra keys) and ``train`` sections; ``sections`` override them.
    """
    from mmpost.cli import main

    images = str(synth_dir / "images")
    sft = run_config(
        "sft",
        stage="sft",
        train={"max_steps": 4},
        data={"train": {"path": str(synth_dir / "sft.json"), "image_root": images}},
    )
    assert main(["train", str(sft)]) == 0

    def write(name: str, stage: dict[str, Any], defaults: dict[str, dict], **sections: Any) -> Path:
        data = {
            split: {**spec, "path": str(synth_dir / spec["path"]), "image_root": images}
            for split, spec in defaults["data"].items()
        }
        return run_config(
            name,
            stage=stage,
            data={**data, **sections.pop("data", {})},
            train={**defaults["train"], **sections.pop("train", {})},
            model={"llm": {}, "encoders": {}, "connectors": {}, **sections.pop("model", {})},
            **{"from": str(tmp_path / "sft"), **sections},
        )

    return write


@pytest.fixture(scope="session")
def demo_sft(tmp_path_factory) -> Path:
    """The demo's align + sft chain (``mmpost demo``), once per session, for the opt-in checks that need a trained
    model; ``MMPOST_DEMO_OUT`` names a finished demo folder to use instead."""
    import os

    from mmpost.demo import run_demo

    if os.environ.get("MMPOST_DEMO_OUT"):
        return Path(os.environ["MMPOST_DEMO_OUT"])
    out = tmp_path_factory.mktemp("demo")
    run_demo(out, stages="sft")
    return out


@pytest.fixture
def calib(synth_dir):
    """Sixteen synthetic conversations with their images, as quantization calibrates on."""
    from mmpost.data.sources import read_records

    return read_records(synth_dir / "sft.json", image_root=synth_dir / "images")[:16]
