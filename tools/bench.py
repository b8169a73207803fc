"""Benchmarks: throughput and memory of a stage, and shared- versus naive-prefill GRPO sampling.

    python tools/bench.py configs/demo/sft.yaml --steps 30 [--warmup 5] [--set train.batch_size=32] [--json out.json]

runs N optimizer steps of a config, its stage built with the config's options (printed as
``stage_options``, defaults filled in), and reports tokens/s (real tokens, media included), samples/s, step
time, peak memory (CPU RSS, or torch.cuda.max_memory_allocated on CUDA) and, on CUDA, model-FLOPs
utilisation. Steps run through the real training loop (data workers, accumulation, clipping, logging) with
evaluation and checkpoints off; the first ``--warmup`` steps are left out of the figures, and each figure is
the median over the measured steps. Model FLOPs per token are the run summary's estimate
(``mmpost.training.trainable.model_flops_per_token``).

A grpo config reports what its metric lines measure instead, ``time/step_s`` being the time of a step's
sampling and optimisation (data loading left out) on the first process:

- ``completions_per_step``: batch_size x grad_accum x group_size x processes (full micro-batches assumed);
- ``completions_per_s``: those completions over ``time/step_s``;
- ``completion_tokens_per_s``: completions x mean ``completion_length`` (new tokens, end-of-sequence
  included, prompts and media not) over ``time/step_s``;
- ``sampling_tokens_per_s``: the same tokens over the sampling part of the step alone
  (``time/step_s x time/sampling_share``), the rollout's generation speed;
- ``completion_length``, ``sampling_share`` and ``step_time_s``: the medians of those metrics.

There is no tokens/s over all tokens and no MFU for grpo: its lines do not count the prompt and media tokens
that are prefilled and trained on.

    python tools/bench.py grpo [--group-size 8] [--prompts 4] [--max-new-tokens 32] [--device cuda] [--json out.json]

times GRPO rollouts, ``LMM.generate(..., num_samples=G)`` with the prompt prefilled once and its KV cache
repeated G times (``share_prefill=True``) against every prompt repeated and prefilled G times, on one
random-weight model (a tiny CLIP tower, an mlp connector, a Llama) and the synthetic counting prompts. Every
sample runs the full ``--max-new-tokens`` (end-of-sequence never stops it); the two paths alternate after a
warm-up call each and the median of ``--repeats`` is reported. The greedy outputs of both paths must be
identical, or the command exits with status 1.

    python tools/bench.py --ab KEY=VALUE CONFIG [--pairs 3] [--prime] [--set ...] [--json out.json]

runs CONFIG as ``bench.py CONFIG`` does and again with ``KEY=VALUE`` (``data.cache_features=DIR``,
``train.compile=true``, ...), each run a process of its own, alternating, and prints both figures with their
peak memory and B / A per pair and in median (``tools/bench_ab.py``). ``python tools/peer_setup.py --size vitb
--stage align --out DIR`` writes a LLaVA-shaped model, data and a config to run it on.

    python tools/bench.py --peer trl sft|dpo|grpo [--size full|tiny] [--pairs 3] [--steps 10] [--warmup 2]
        [--variable-length] [--set train.batch_size=8 ...] [--json out.json]

trains one random-weight model (a SigLIP tower, a 2-layer mlp connector and an 8-layer SmolLM2-shaped Llama;
``--size tiny`` for a smoke run) for the stage with mmpost, through its training loop, and with TRL's trainer on
mmpost's LLaVA export of it, on the same samples with the same settings (``--set`` keys reach TRL where it has
them). Each timed run is a process of its own and the sides alternate, mmpost then TRL, ``--pairs`` times; it
prints each run's figure (sft tokens/s with media tokens, dpo pairs/s, grpo completions/s) with its peak memory,
mmpost/TRL per pair, the medians, both sides' first-step loss, and where the two compute differently.
``--variable-length`` gives sft replies long-tailed lengths and packs them on the mmpost side where
``data.packing`` exists. The details are in ``tools/peer_trl.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
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


def bench_stage(argv: list[str]) -> int:
    from mmpost.cli import quiet_libraries
    from mmpost.config import load_config
    from mmpost.stages import build_stage, stage_options
    from mmpost.training.metrics import read_metrics

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--set", nargs="+", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak, for MFU")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    quiet_libraries()
    overrides = [o for group in args.set for o in group]
    with tempfile.TemporaryDirectory() as tmp:
        overrides += [
            f"out={tmp}/run",
            f"train.max_steps={args.steps + args.warmup}",
            "train.log_every=1",
            "train.save_every=0",
            "train.eval_every=0",
            "data.eval=null",
        ]
        cfg = load_config(args.config, overrides)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        summary = build_stage(cfg).run(cfg)
        wall = time.perf_counter() - started
        lines = [r for r in read_metrics(Path(tmp) / "run") if "loss" in r][args.warmup :]
    if not lines:
        parser.error(f"no step left to measure after --warmup {args.warmup}; raise --steps")
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    result = {
        "config": args.config,
        "stage": cfg.stage.name,
        "stage_options": stage_options(cfg),
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu ({torch.get_num_threads()} threads)",
        "processes": processes,
        "settings": [o for group in args.set for o in group],
        "steps_measured": len(lines),
    }
    if cfg.stage.name == "grpo":
        result |= grpo_figures(lines, cfg, result["stage_options"]["group_size"], processes)
    else:
        result |= throughput_figures(lines, cfg, processes)
    result["wall_s_including_setup"] = round(wall, 1)
    if torch.cuda.is_available():
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    else:
        result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    peak = peak_tflops(args.peak_tflops)
    if peak and "tokens_per_s" in result:
        result["mfu"] = round(summary["model_flops_per_token"] * result["tokens_per_s"] / (peak * 1e12), 4)
    for key, value in result.items():
        print(f"{key:>24}: {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def throughput_figures(lines: list[dict], cfg, processes: int) -> dict:
    """Tokens/s, samples/s and step time of a stage whose metric lines carry ``tokens_per_s`` (all but grpo)."""
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in lines)
    samples_per_s = statistics.median(r["samples_per_s"] for r in lines)
    global_batch = cfg.train.batch_size * cfg.train.grad_accum * processes
    return {
        "global_batch": global_batch,
        "tokens_per_s": round(tokens_per_s, 1),
        "samples_per_s": round(samples_per_s, 2),
        "step_time_s": round(global_batch / samples_per_s, 4),
    }


def grpo_figures(lines: list[dict], cfg, group_size: int, processes: int) -> dict:
    """Completions/s and completion tokens/s of grpo steps, from ``time/step_s`` and ``completion_length``."""
    prompts = cfg.train.batch_size * cfg.train.grad_accum * processes
    completions = prompts * group_size

    def median(figure) -> float:
        return statistics.median(figure(r) for r in lines)

    def new_tokens(r: dict) -> float:  # completion_length is the mean over every process's completions
        return completions * r["completion_length"]

    return {
        "prompts_per_step": prompts,
        "completions_per_step": completions,
        "completions_per_s": round(median(lambda r: completions / r["time/step_s"]), 2),
        "completion_tokens_per_s": round(median(lambda r: new_tokens(r) / r["time/step_s"]), 1),
        "sampling_tokens_per_s": round(
            median(lambda r: new_tokens(r) / (r["time/step_s"] * r["time/sampling_share"])), 1
        ),
        "completion_length": round(median(lambda r: r["completion_length"]), 2),
        "sampling_share": round(median(lambda r: r["time/sampling_share"]), 3),
        "step_time_s": round(median(lambda r: r["time/step_s"]), 4),
    }


# ----------------------------------------------------------------- grpo


def grpo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench.py grpo", description="GRPO sampling throughput: shared prefill vs G-fold prefill."
    )
    parser.add_argument("--group-size", type=int, default=8, help="samples per prompt (G)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per batch")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per path; the median is reported")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--clip-hidden", type=int, default=64, help="vision tower width")
    parser.add_argument("--llm-hidden", type=int, default=256, help="LLM width (heads of 64)")
    parser.add_argument("--llm-layers", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="where to write the model and data (a temporary folder if unset)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser


def build_grpo_inputs(args: argparse.Namespace, out: Path):
    """The random-weight LMM and a left-padded batch of ``--prompts`` counting prompts, on ``--device``."""
    import mmpost
    from mmpost.data.pipeline import PromptPipeline
    from mmpost.data.sources import read_records
    from mmpost.synthetic.tiny_llm import make_tiny_llm, make_tiny_tokenizer
    from mmpost.synthetic.tiny_vision import make_tiny_clip
    from mmpost.synthetic.write import synthesize

    synthesize(out / "data", num_train=args.prompts, num_heldout=0, image_size=max(args.image_size, 32), progress=False)
    heads = max(1, args.llm_hidden // 64)
    llm = make_tiny_llm(
        out / "llm",
        make_tiny_tokenizer(out / "llm"),
        hidden_size=args.llm_hidden,
        layers=args.llm_layers,
        heads=heads,
        kv_heads=max(1, heads // 2),
        intermediate_size=4 * args.llm_hidden,
        seed=args.seed,
    )
    clip = make_tiny_clip(out / "clip", args.image_size, args.patch_size, hidden_size=args.clip_hidden, seed=args.seed)
    torch.manual_seed(args.seed)
    model = mmpost.LMM(
        llm=str(llm),
        encoders={"image": mmpost.encoder("hf_vision", path=str(clip))},
        connectors={"image": mmpost.connector("mlp")},
    )
    model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    prompts = read_records(out / "data" / "count.json", image_root=out / "data" / "images")
    pipeline = PromptPipeline.for_model(model, max_length=4096)  # user-only prompts, left-padded
    batch = pipeline.collate([pipeline.process(s) for s in prompts])
    if len(batch.ids) != args.prompts:
        raise RuntimeError(f"{len(batch.ids)} of the {args.prompts} prompts made it into the batch")
    return model, batch.to(args.device)


def bench_grpo(args: argparse.Namespace) -> dict:
    """Times ``generate(num_samples=G)`` with and without a shared prefill and checks their greedy tokens agree.

    Returns:
        the figures: median seconds per batch and completion tokens/s of each path, their ratio
        ``naive_over_shared`` (> 1: sharing is faster), media tokens per prompt, prompt length and
        ``greedy_identical``.
    """
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        model, batch = build_grpo_inputs(args, out)
    media_tokens = model.media_tokens("image", (3, args.image_size, args.image_size))
    ids, mask = batch.input_ids, batch.attention_mask
    placeholders = (ids == model.placeholder_ids["image"]).sum(-1)  # [P]
    if not bool((placeholders == media_tokens).all()):
        raise RuntimeError(f"prompts hold {placeholders.tolist()} media tokens, media_tokens() says {media_tokens}")

    G, new_tokens = args.group_size, args.max_new_tokens
    # eos_token_id=None: no sample stops early, so both paths decode P*G rows for the full length
    common = dict(max_new_tokens=new_tokens, num_samples=G, eos_token_id=None)

    def run(share: bool, **kwargs) -> tuple[float, torch.Tensor]:
        torch.manual_seed(args.seed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        tokens = model.generate(ids, mask, batch.media, share_prefill=share, **common, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started, tokens

    sampling = dict(do_sample=True, temperature=1.0, top_p=1.0)
    times: dict[bool, list[float]] = {True: [], False: []}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for share in (True, False):
            seconds, tokens = run(share, **sampling)
            if tokens.shape != (ids.shape[0] * G, new_tokens):
                raise RuntimeError(f"expected {(ids.shape[0] * G, new_tokens)} new tokens, got {tuple(tokens.shape)}")
            if repeat:
                times[share].append(seconds)
    greedy_identical = torch.equal(run(True)[1], run(False)[1])

    completions = ids.shape[0] * G * new_tokens
    shared_s, naive_s = statistics.median(times[True]), statistics.median(times[False])
    llm_params = sum(p.numel() for p in model.base_llm.parameters())
    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": args.dtype,
        "llm": f"llama, width {args.llm_hidden}, {args.llm_layers} layers, {llm_params / 1e6:.2f}M parameters",
        "prompts": ids.shape[0],
        "group_size": G,
        "max_new_tokens": new_tokens,
        "media_tokens_per_prompt": media_tokens,
        "prompt_length": ids.shape[1],
        "repeats": args.repeats,
        "shared_s": round(shared_s, 4),
        "naive_s": round(naive_s, 4),
        "shared_tokens_per_s": round(completions / shared_s, 1),
        "naive_tokens_per_s": round(completions / naive_s, 1),
        "naive_over_shared": round(naive_s / shared_s, 3),
        "greedy_identical": greedy_identical,
    }


def sibling(name: str):
    """The module of ``tools/NAME.py`` (tools/ is no package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def peer(argv: list[str]) -> int:
    """``--peer trl STAGE ...``: the comparison with TRL, in ``tools/peer_trl.py``."""
    if argv[:1] != ["trl"]:
        raise SystemExit(f"bench.py --peer: the one peer is trl, not {' '.join(argv[:1]) or 'nothing'}")
    return sibling("peer_trl").main(argv[1:])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--peer"]:
        return peer(argv[1:])
    if argv[:1] == ["--ab"]:
        return sibling("bench_ab").main(argv[1:])
    if argv[:1] != ["grpo"]:
        return bench_stage(argv)
    from mmpost.cli import quiet_libraries

    args = grpo_parser().parse_args(argv[1:])
    quiet_libraries()
    result = bench_grpo(args)
    for key, value in result.items():
        print(f"{key:>24}: {value}")
    print(f"greedy outputs identical: {result['greedy_identical']}")
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result["greedy_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
