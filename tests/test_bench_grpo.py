"""``tools/bench.py grpo`` at tiny sizes: both sampling paths run and their greedy tokens agree."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grpo_bench_reports_both_paths_and_identical_greedy_tokens(tmp_path, one_thread, capsys):
    sizes = "--group-size 2 --prompts 1 --max-new-tokens 2 --repeats 1 --image-size 32 --clip-hidden 32"
    argv = ["grpo", *sizes.split(), "--llm-hidden", "64", "--llm-layers", "1", "--out", str(tmp_path / "run")]
    assert load_bench().main([*argv, "--json", str(tmp_path / "grpo.json")]) == 0
    printed = capsys.readouterr().out
    assert "greedy outputs identical: True" in printed
    result = json.loads(printed.strip().splitlines()[-1])
    assert result == json.loads((tmp_path / "grpo.json").read_text())
    assert result["greedy_identical"] is True
    assert result["media_tokens_per_prompt"] == 16  # (32 / 8) ** 2 patches, CLS dropped
    assert result["naive_over_shared"] > 0
    assert result["shared_tokens_per_s"] > 0 and result["naive_tokens_per_s"] > 0
