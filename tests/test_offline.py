"""Hub ids with no network: one ``mmpost: error:`` line within seconds (offline mode, or an unreachable hub),
and a hub id already in the local Hugging Face cache loads with no network at all."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub.constants
import pytest

from mmpost.config.schema import LLMConfig
from mmpost.model.llm import load_llm
from mmpost.weights import locate_pretrained

MISSING = "someorg/missing-model"
# Startup (torch, transformers) takes a few seconds; without the check, the hub client's retries alone take ~50 s.
LIMIT_S = 40


def hub_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment with an empty Hugging Face cache in ``tmp_path``, and no offline switch, endpoint or
    proxy of its own (a proxy would be probed instead of the endpoint)."""
    dropped = {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"}
    env = {k: v for k, v in os.environ.items() if k not in dropped and not k.lower().endswith("_proxy")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"), **extra)
    return env


def train_with_missing_llm(config: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "mmpost", "train", str(config), "--set", f"model.llm.path={MISSING}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=LIMIT_S,
    )
    return done, time.perf_counter() - started


def assert_one_error_line(done: subprocess.CompletedProcess, *words: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("mmpost: error: "), done.stderr[-2000:]
    for word in ("model.llm.path", MISSING, *words):
        assert word in lines[0], lines[0]


def test_hub_id_in_offline_mode_fails_at_once_naming_it(run_config, tmp_path):
    done, seconds = train_with_missing_llm(run_config(), hub_env(tmp_path, HF_HUB_OFFLINE="1"))
    assert_one_error_line(done, "HF_HUB_OFFLINE")
    assert seconds < LIMIT_S


def test_hub_id_with_an_unreachable_hub_fails_in_seconds(run_config, tmp_path):
    # port 9 (discard) on the loopback: nothing listens, so the connection is refused at once
    done, seconds = train_with_missing_llm(run_config(), hub_env(tmp_path, HF_ENDPOINT="http://127.0.0.1:9"))
    assert_one_error_line(done, "HF_HUB_OFFLINE", "127.0.0.1:9")
    assert seconds < LIMIT_S


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache in ``tmp_path`` and offline mode, as huggingface_hub reads them at call time."""
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def cache_snapshot(cache: Path, repo_id: str, files: Path) -> Path:
    """Lays ``files`` out as the hub client caches a download of ``repo_id`` (refs/main -> snapshots/<commit>)."""
    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(files, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def test_cached_hub_id_loads_offline(offline_cache, llm_dir):
    snapshot = cache_snapshot(offline_cache, "someorg/tiny-llm", llm_dir)
    assert Path(locate_pretrained("someorg/tiny-llm", "model.llm.path")) == snapshot
    model, tokenizer = load_llm(LLMConfig(path="someorg/tiny-llm"))
    assert model.config.hidden_size == 64 and len(tokenizer) > 0


def test_hf_vision_hub_id_fails_like_the_llm(offline_cache):
    from mmpost.encoders import ENCODERS

    with pytest.raises(FileNotFoundError, match="someorg/missing-tower.*HF_HUB_OFFLINE"):
        ENCODERS.build("hf_vision", path="someorg/missing-tower")


def test_cached_hf_vision_tower_loads_offline(offline_cache, clip_dir):
    from mmpost.encoders import ENCODERS

    cache_snapshot(offline_cache, "someorg/tiny-clip", clip_dir)
    assert ENCODERS.build("hf_vision", path="someorg/tiny-clip").model_type == "clip"


@pytest.mark.parametrize("path", ["./no/such/dir", "no/such/dir", "/no/such"])
def test_missing_local_paths_are_not_taken_for_hub_ids(path, offline_cache):
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        locate_pretrained(path, "model.llm.path")
    assert "HF_HUB_OFFLINE" not in str(err.value)
