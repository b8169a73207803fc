"""Throughput and memory of a stage: runs N optimizer steps of a config and reports

    tokens/s (real tokens, media included), samples/s, step time, peak memory (CPU RSS, or
    torch.cuda.max_memory_allocated on CUDA) and, on CUDA, model-FLOPs utilisation.

    python tools/bench.py configs/demo/sft.yaml --steps 30 [--warmup 5] [--set train.batch_size=32] [--json out.json]

Steps run through the real training loop (data workers, accumulation, clipping, logging) with
evaluation and checkpoints off; the first ``--warmup`` steps are left out of the figures.
Model FLOPs per token are the run summary's estimate (``mmpost.training.parts.model_flops_per_token``).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# Dense bf16 peak of common accelerators (TFLOP/s), for MFU; pass --peak-tflops for others.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def main() -> int:
    from mmpost.cli import quiet_libraries
    from mmpost.config import load_config
    from mmpost.stages import STAGES
    from mmpost.training.metrics import read_metrics

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--set", nargs="+", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak, for MFU")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    quiet_libraries()
    overrides = [o for group in args.set for o in group]
    with tempfile.TemporaryDirectory() as tmp:
        overrides += [
            f"out={tmp}/run", f"train.max_steps={args.steps + args.warmup}", "train.log_every=1",
            "train.save_every=0", "train.eval_every=0", "data.eval=null",
        ]  # fmt: skip
        cfg = load_config(args.config, overrides)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        summary = STAGES.build(cfg.stage["name"]).run(cfg)
        wall = time.perf_counter() - started
        lines = [r for r in read_metrics(Path(tmp) / "run") if "loss" in r][args.warmup :]
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in lines)
    samples_per_s = statistics.median(r["samples_per_s"] for r in lines)
    result = {
        "config": args.config,
        "stage": cfg.stage["name"],
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu ({torch.get_num_threads()} threads)",
        "steps_measured": len(lines),
        "global_batch": cfg.train.batch_size * cfg.train.grad_accum,
        "tokens_per_s": round(tokens_per_s, 1),
        "samples_per_s": round(samples_per_s, 2),
        "step_time_s": round(cfg.train.batch_size * cfg.train.grad_accum / samples_per_s, 4),
        "wall_s_including_setup": round(wall, 1),
    }
    if torch.cuda.is_available():
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    else:
        result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    peak = peak_tflops(args.peak_tflops)
    if peak:
        result["mfu"] = round(summary["model_flops_per_token"] * tokens_per_s / (peak * 1e12), 4)
    for key, value in result.items():
        print(f"{key:>24}: {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
