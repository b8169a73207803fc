"""One setting against the same run without it (``bench.py --ab``):

    python tools/bench.py --ab KEY=VALUE CONFIG [--pairs 3] [--steps 10] [--warmup 2] [--prime]
        [--set KEY=VALUE ...] [--json out.json]

e.g. ``--ab data.cache_features=DIR`` (cached frozen-encoder features) or ``--ab train.compile=true``. Run A is
``bench.py CONFIG`` with the ``--set`` keys, run B the same with ``KEY=VALUE`` as well; each is a process of its
own, so that its peak memory is its own and nothing it built (a compiled graph, a warm cache in memory) reaches
the other. They alternate, A then B, ``--pairs`` times, and the command prints each run's figure (tokens/s with
media tokens; grpo: completions/s), step time and peak memory, B / A per pair and the medians.

``--prime`` runs B once before the pairs, unmeasured: with ``data.cache_features``, every measured B run then
reads a cache an earlier run filled, as a later run on the same cache does (a run fills the cache before its
first step, so the filling is outside the step figures either way, but inside the run's wall time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH = Path(__file__).with_name("bench.py")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench.py --ab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("setting", metavar="KEY=VALUE", help="what run B adds to the config")
    p.add_argument("config")
    p.add_argument("--pairs", type=int, default=3, help="pairs of timed runs, A then B")
    p.add_argument("--steps", type=int, default=10, help="measured optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="optimizer steps before the measured ones")
    p.add_argument("--prime", action="store_true", help="run B once, unmeasured, before the pairs")
    p.add_argument("--set", nargs="+", action="append", default=[], metavar="KEY=VALUE", help="both runs' config keys")
    p.add_argument("--json", type=Path, help="also write everything here")
    return p


def timed_run(args: argparse.Namespace, settings: list[str], out: Path) -> dict[str, Any]:
    """``bench.py CONFIG`` with ``settings``, in a process of its own; returns its figures."""
    command = [sys.executable, str(BENCH), args.config, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    command += ["--json", str(out)] + (["--set", *settings] if settings else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise SystemExit(
            f"bench.py {' '.join(command[2:])} failed (exit status {done.returncode}); its output is above"
        )
    return json.loads(out.read_text())


def figure_of(result: dict[str, Any]) -> str:
    return "completions_per_s" if "completions_per_s" in result else "tokens_per_s"


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if "=" not in args.setting:
        parser().error(f"the setting must be KEY=VALUE, not {args.setting!r}")
    if min(args.warmup, args.steps, args.pairs) < 1:
        parser().error("--warmup, --steps and --pairs must be at least 1")
    common = [o for group in args.set for o in group]
    sides = {"A": common, "B": [*common, args.setting]}
    runs: list[dict[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.prime:
            print(f"priming: B ({args.setting}) once, unmeasured", flush=True)
            timed_run(args, sides["B"], Path(tmp) / "prime.json")
        for k in range(1, args.pairs + 1):
            runs.append({})
            for side, settings in sides.items():
                print(f"pair {k}/{args.pairs}: {side}", flush=True)
                runs[-1][side] = timed_run(args, settings, Path(tmp) / f"{side}-{k}.json")
    figure = figure_of(runs[0]["A"])
    memory = "peak_memory_gib" if "peak_memory_gib" in runs[0]["A"] else "peak_rss_gib"
    ratios = [r["B"][figure] / r["A"][figure] for r in runs]
    result = {
        "config": args.config,
        "setting": args.setting,
        "common": common,
        "figure": figure,
        "device": runs[0]["A"]["device"],
        "steps_measured": args.steps,
        "warmup_steps": args.warmup,
        "primed": args.prime,
        "runs": runs,
        "ratio_per_pair": [round(x, 3) for x in ratios],
        "A_median": round(statistics.median(r["A"][figure] for r in runs), 2),
        "B_median": round(statistics.median(r["B"][figure] for r in runs), 2),
        "ratio_median": round(statistics.median(ratios), 3),
    }
    print(f"\n{args.config} on {result['device']}: A as configured, B with {args.setting}")
    print(f"{args.steps} measured steps after {args.warmup} warm-up, {args.pairs} pair(s); figure: {figure}")
    print(f"{'pair':>6} {'A':>12} {'step s':>8} {memory:>13} {'B':>12} {'step s':>8} {memory:>13} {'B/A':>7}")
    for k, (run, ratio) in enumerate(zip(runs, ratios, strict=True), start=1):
        a, b = run["A"], run["B"]
        print(
            f"{k:>6} {a[figure]:>12.2f} {a['step_time_s']:>8.3f} {a[memory]:>13} "
            f"{b[figure]:>12.2f} {b['step_time_s']:>8.3f} {b[memory]:>13} {ratio:>7.3f}"
        )
    print(
        f"{'median':>6} {result['A_median']:>12.2f} {'':>8} {'':>13} {result['B_median']:>12.2f} {'':>8} {'':>13} "
        f"{result['ratio_median']:>7.3f}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0
