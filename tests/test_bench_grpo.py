"""``tools/bench.py grpo`` at tiny sizes: both sampling paths run and their greedy tokens agree."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

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


GRPO_DEFAULTS = {"data": {"train": {"path": "count.json"}}, "train": {"lr": 1e-3, "batch_size": 2}}


def test_stage_bench_runs_a_grpo_config_with_its_options(after_sft, tmp_path, one_thread, capsys):
    # max_completion_length 3, not the stage's default 32: the bench must run (and report) the config's stage
    options = {"name": "grpo", "group_size": 2, "max_completion_length": 3}
    config = after_sft("grpo", options, GRPO_DEFAULTS)
    out = tmp_path / "bench.json"
    assert load_bench().main([str(config), "--steps", "2", "--warmup", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["stage"] == "grpo" and result["steps_measured"] == 2
    assert result["stage_options"]["max_completion_length"] == 3 and result["stage_options"]["group_size"] == 2
    assert result["stage_options"]["temperature"] == 1.0  # a default, resolved from the stage's constructor
    assert "'max_completion_length': 3" in printed
    assert result["completions_per_step"] == 2 * 2  # batch_size x grad_accum x group_size x one process
    assert 0 < result["completion_length"] <= 3
    assert result["completions_per_s"] > 0 and result["completion_tokens_per_s"] > 0
    assert result["sampling_tokens_per_s"] >= result["completion_tokens_per_s"]
    assert "tokens_per_s" not in result and "mfu" not in result  # no prompt-token count in grpo's metric lines


def test_build_stage_passes_the_config_options(run_config):
    from mmpost.config import load_config
    from mmpost.stages import build_stage, stage_options

    cfg = load_config(run_config(stage={"name": "grpo", "group_size": 3, "max_completion_length": 5}))
    stage = build_stage(cfg)
    assert (stage.options.group_size, stage.options.max_completion_length) == (3, 5)
    resolved = stage_options(cfg)
    assert resolved["group_size"] == 3 and resolved["max_completion_length"] == 5
    assert resolved["iterations"] == 1 and "name" not in resolved


def test_the_bench_runs_exactly_the_stage_that_train_runs(after_sft, tmp_path, one_thread, monkeypatch):
    import mmpost.stages
    from mmpost.cli import main

    built = []
    original = mmpost.stages.build_stage

    def record(cfg):
        built.append(cfg.stage)
        return original(cfg)

    monkeypatch.setattr(mmpost.stages, "build_stage", record)
    options = {"name": "grpo", "group_size": 2, "max_completion_length": 3, "temperature": 0.7, "beta": 0.0}
    config = after_sft("grpo-same", options, GRPO_DEFAULTS)
    assert load_bench().main([str(config), "--steps", "1", "--warmup", "0"]) == 0
    assert main(["train", str(config), "--set", f"out={tmp_path / 'trained'}", "train.max_steps=1"]) == 0
    bench_stage, train_stage = built
    assert bench_stage == train_stage and bench_stage.temperature == 0.7


@pytest.mark.slow  # two trainers, each in a process of its own: ~45 s on 2 CPU cores
def test_the_trl_peer_run_starts_from_the_same_loss(tmp_path):
    out = tmp_path / "peer.json"
    argv = ["--peer", "trl", "sft", "--size", "tiny", "--pairs", "1", "--steps", "2", "--warmup", "1"]
    assert load_bench().main([*argv, "--work", str(tmp_path / "work"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    first = result["first_step"]
    assert abs(first["mmpost"]["loss"] - first["trl"]["loss"]) < 1e-4
    run = result["runs"][0]
    assert run["mmpost"]["measured_units"] == run["trl"]["measured_units"] > 0  # the same tokens counted


@pytest.mark.slow  # three runs, each in a process of its own: ~1 min on 2 CPU cores
def test_the_ab_bench_runs_the_setting_in_b_only(tmp_path):
    bench = load_bench()
    config = bench.sibling("peer_setup").write_bench_run(tmp_path / "work", "tiny", "align", samples=8, seed=0)
    cache, out = tmp_path / "cache", tmp_path / "ab.json"
    argv = ["--ab", f"data.cache_features={cache}", str(config), "--pairs", "1", "--steps", "1", "--warmup", "1"]
    assert bench.main([*argv, "--prime", "--set", "train.batch_size=2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    run = result["runs"][0]
    assert run["A"]["settings"] == ["train.batch_size=2"]
    assert run["B"]["settings"] == ["train.batch_size=2", f"data.cache_features={cache}"]
    assert len(list(cache.glob("image/*/*.npy"))) == 8  # the primed run filled it with the data set's 8 images
    assert result["ratio_median"] == pytest.approx(run["B"]["tokens_per_s"] / run["A"]["tokens_per_s"], rel=1e-2)
