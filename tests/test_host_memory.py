"""``train.keep_freed_memory``: on a CPU with glibc, memory that large tensors free is reused by the next ones
without being faulted in again; a run applies it on a CPU unless the setting is off."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from mmpost.cli import main

# 64 MiB tensors, well above glibc's largest mmap threshold (32 MiB); the last five counted
FAULTS = """
import resource, sys, torch
from mmpost.training.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
for _ in range(10):
    x = torch.ones(2**24); del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    x = torch.ones(2**24); del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and bool(ctypes.CDLL(None).gnu_get_libc_version)
    except (OSError, AttributeError):
        return False


@pytest.mark.skipif(not glibc(), reason="glibc's malloc only")
def test_a_freed_tensor_memory_is_reused_without_page_faults():
    runs = {
        m: subprocess.run([sys.executable, "-c", FAULTS, m], capture_output=True, text=True, check=True)
        for m in ("keep", "release")
    }
    faults = {mode: int(run.stdout) for mode, run in runs.items()}
    pages = 5 * 2**26 // 4096  # what five fresh 64 MiB blocks fault in
    assert faults["release"] >= 0.9 * pages
    assert faults["keep"] < 0.02 * pages


@pytest.mark.parametrize("keep", [True, False])
def test_a_cpu_run_keeps_freed_memory_unless_told_not_to(run_config, monkeypatch, keep):
    calls = []
    monkeypatch.setattr("mmpost.training.context.keep_freed_memory", lambda: calls.append(1) or True)
    cfg = run_config(f"keep-{keep}", train={"max_steps": 1, "keep_freed_memory": keep}, data={"num_workers": 0})
    assert main(["train", str(cfg)]) == 0
    assert len(calls) == (1 if keep else 0)
