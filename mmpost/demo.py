"""``mmpost demo``: the whole chain on a laptop CPU with no network.

Writes the synthetic shapes data, builds a tiny LLM (tokenizer trained on the data's text) and a tiny
CLIP vision tower (pretrained for ~20 s on other synthetic scenes, standing in for CLIP's
pretraining), aligns the connector on captions, instruction-tunes on questions, evaluates
held-out accuracy before and after each stage, exports to transformers' LLaVA layout (verified by
reloading), and writes ``OUT/summary.json``. The stage configs are ``configs/demo/*.yaml``; the demo
only points their paths into ``OUT``.

``--stages all`` goes on after sft: ``dpo`` on synthetic preference pairs from the sft model, and ``grpo``
on counting questions from ``sft_short``, the sft config stopped after 60 steps at a constant learning
rate so that its counting is still unreliable (GRPO has something to improve; after the full sft it is
already near 0.92); then ``distill`` trains a student with a smaller LLM (half the width and layers, same
tokenizer) on the sft model's distributions, and the sft model is also exported with int4 GPTQ weights.

``--stages rlhf`` is the RLHF recipe instead: after sft, ``rm`` trains a reward model (a scalar head on the sft
model) on the preference pairs, and ``ppo`` trains ``sft_short`` against that reward model alone, with a value head
on the policy's trunk; no answer checker is used, so held-out counting accuracy measures what the reward model
taught.

The tiny LLM starts from random weights, so alignment alone (LLM frozen) cannot answer questions:
it only fits the connector. Instruction tuning then trains connector and LLM.

``--quick`` runs the same chain on a sliver of the data with a few steps: a smoke test of the
install, not a result.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from mmpost.config import load_config

log = logging.getLogger("mmpost")

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "demo"
TRAIN_IMAGES, HELDOUT_IMAGES, TOWER_PRETRAIN_STEPS = 4000, 300, 800
QUICK = {
    "train": 96,
    "heldout": 30,
    "pretrain": 20,
    "steps": {"align": 4, "sft": 8, "sft_short": 4, "dpo": 4, "grpo": 4, "distill": 4, "rm": 4, "ppo": 4},
}
SFT_SHORT_STEPS = 60
STAGE_ORDER = ("align", "sft", "dpo", "sft_short", "grpo", "distill")
CHAINS = {  # --stages
    "sft": ("align", "sft"),
    "all": STAGE_ORDER,
    "rlhf": ("align", "sft", "sft_short", "rm", "ppo"),
}
DATA = {  # train and eval files of each stage, under OUT/data
    "align": ("align.json", "heldout.jsonl"),
    "sft": ("sft.json", "heldout.jsonl"),
    "sft_short": ("sft.json", "heldout.jsonl"),
    "dpo": ("pairs.json", "pairs_heldout.jsonl"),
    "grpo": ("count.json", "count_heldout.jsonl"),
    "distill": ("sft.json", "heldout.jsonl"),
    "rm": ("reward_pairs.json", "reward_pairs_heldout.jsonl"),
    "ppo": ("count.json", "count_heldout.jsonl"),
}
STARTS_FROM = {"sft": "align", "sft_short": "align", "dpo": "sft", "grpo": "sft_short", "rm": "sft", "ppo": "sft_short"}


def build_parts(out: Path, quick: bool = False) -> None:
    """Synthetic data plus the tiny LLM and CLIP tower the demo configs name."""
    from mmpost.synthetic.tiny_llm import make_tiny_llm, make_tiny_tokenizer
    from mmpost.synthetic.tiny_vision import make_tiny_clip, pretrain_tiny_tower
    from mmpost.synthetic.write import synthesize

    n_train, n_heldout = (QUICK["train"], QUICK["heldout"]) if quick else (TRAIN_IMAGES, HELDOUT_IMAGES)
    synthesize(out / "data", num_train=n_train, num_heldout=n_heldout, image_size=64)
    texts = []
    for name in ("align.json", "sft.json"):
        for record in json.loads((out / "data" / name).read_text()):
            texts += [turn["value"] for turn in record["conversations"]]
    tokenizer = make_tiny_tokenizer(out / "base" / "llm", texts)
    make_tiny_llm(
        out / "base" / "llm", tokenizer, hidden_size=128, layers=4, heads=4, kv_heads=2, intermediate_size=384
    )
    # the distillation student's LLM: same tokenizer, half the width and layers
    make_tiny_llm(
        out / "base" / "llm_small", tokenizer, hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=192
    )
    tower = make_tiny_clip(out / "base" / "clip", image_size=64, patch_size=8, hidden_size=64, layers=2, heads=4)
    scores = pretrain_tiny_tower(tower, steps=QUICK["pretrain"] if quick else TOWER_PRETRAIN_STEPS)
    log.info("tower pretrained: accuracy of linear heads on its features %s", scores)


def stage_overrides(out: Path, stage: str, quick: bool = False) -> list[str]:
    data = out / "data"
    images = data / "images"
    train, held_out = DATA[stage]
    common = [f"train.max_steps={QUICK['steps'][stage]}", "train.save_every=4"] if quick else []
    if stage == "sft_short" and not quick:
        common += [f"train.max_steps={SFT_SHORT_STEPS}", "train.schedule=constant", "train.save_every=0"]
    common += [
        f"out={out / 'runs' / stage}",
        f"data.train.path={data / train}",
        f"data.train.image_root={images}",
        f"data.eval.path={data / held_out}",
        f"data.eval.image_root={images}",
    ]
    if stage == "align":
        return [*common, f"model.llm.path={out / 'base' / 'llm'}", f"model.encoders.image.path={out / 'base' / 'clip'}"]
    if stage == "distill":
        base = out / "base"
        return [
            *common,
            f"model.llm.path={base / 'llm_small'}",
            f"model.encoders.image.path={base / 'clip'}",
            f"stage.teacher={out / 'runs' / 'sft'}",
        ]
    if stage == "ppo":  # driven by the demo's own reward model
        common.append(f"stage.rewards=[{{name: model, path: {out / 'runs' / 'rm'}}}]")
    return [*common, f"from={out / 'runs' / STARTS_FROM[stage]}"]


def stage_summary(stage: str, result: dict[str, Any], run: Path) -> dict[str, Any]:
    """The figures of one stage for ``summary.json`` and the table."""
    before, after = result["eval_before"] or {}, result["eval_after"] or {}
    key = "eval/preference_accuracy" if stage == "dpo" else "eval/accuracy"
    summary = {
        "heldout_accuracy_before": before.get(key),
        "heldout_accuracy": after.get(key),
        "per_task": {k.split("/")[-1]: v for k, v in after.items() if k.startswith("eval/accuracy/")},
        "heldout_loss": after.get("eval/loss"),
        "steps": result["steps"],
        "seconds": result["seconds"],
        "run": str(run),
    }
    if stage == "dpo":
        summary["heldout_logps_rejected"] = [before.get("eval/logps/rejected"), after.get("eval/logps/rejected")]
        summary["heldout_logps_chosen"] = [before.get("eval/logps/chosen"), after.get("eval/logps/chosen")]
    return summary


def accuracy_of(evaluation: dict[str, Any] | None) -> float | None:
    return None if not evaluation else evaluation.get("eval/accuracy")


def run_demo(out: Path, force: bool = False, quick: bool = False, stages: str = "sft") -> dict[str, Any]:
    """Runs the demo into ``out`` and returns the summary (also written to ``out/summary.json``).

    Args:
        stages: a chain of ``CHAINS``: ``sft`` (align, sft), ``all`` (align, sft, dpo, sft_short, grpo, distill) or
            ``rlhf`` (align, sft, sft_short, then ``rm`` on the preference pairs from sft and ``ppo`` from sft_short
            driven by that reward model alone).

    Raises:
        FileExistsError: if ``out`` is not empty and ``force`` is False.
        FileNotFoundError: if the demo configs (a source checkout's ``configs/demo``) are missing.
    """
    from mmpost.export import export, read_report
    from mmpost.stages import build_stage

    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; name a directory for the demo")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"--out {out} is not empty; pass --force to replace it")
        shutil.rmtree(out)
    if not (CONFIG_DIR / "align.yaml").is_file():
        raise FileNotFoundError(f"{CONFIG_DIR} is missing: run the demo from a source checkout (pip install -e .)")
    started = time.perf_counter()
    log.info("synthetic data and tiny models -> %s", out)
    build_parts(out, quick)
    if stages not in CHAINS:
        raise ValueError(f"--stages must be one of {', '.join(CHAINS)}; got {stages!r}")
    names = CHAINS[stages]
    summary: dict[str, Any] = {"stages": {}, "export": None, "quick": quick}
    for stage in names:
        config = CONFIG_DIR / f"{'sft' if stage == 'sft_short' else stage}.yaml"
        log.info("%s (%s)", stage, config)
        cfg = load_config(config, stage_overrides(out, stage, quick))
        result = build_stage(cfg).run(cfg)
        s = summary["stages"][stage] = stage_summary(stage, result, out / "runs" / stage)
        log.info("%s: held-out accuracy %s -> %s", stage, s["heldout_accuracy_before"], s["heldout_accuracy"])
    log.info("export to transformers' LLaVA layout")
    summary["export"] = str(export(out / "runs" / "sft", out / "export", fmt="hf"))
    if stages == "all":
        log.info("quantized export: int4 weights, GPTQ calibrated on the sft data with its images")
        quantized = export(out / "runs" / "sft", out / "export_w4", fmt="hf", quantize="w4a16-gptq")
        summary["quantized_export"] = {"dir": str(quantized), **read_report(quantized)}
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["example_image"] = str(min((out / "data" / "images" / "heldout").glob("*.png")))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_table(summary)
    return summary


def print_table(summary: dict[str, Any]) -> None:
    print(f"\n{'stage':<10}{'steps':>7}{'seconds':>9}{'accuracy before':>17}{'after':>8}   per task (after)")
    for stage, s in summary["stages"].items():
        tasks = ", ".join(f"{k} {v:.2f}" for k, v in s["per_task"].items())
        if stage == "dpo":
            tasks = "preference accuracy; log-prob of rejected answers {:.2f} -> {:.2f}".format(
                *s["heldout_logps_rejected"]
            )
        print(
            f"{stage:<10}{s['steps']:>7}{s['seconds']:>9.0f}{s['heldout_accuracy_before']:>17.3f}"
            f"{s['heldout_accuracy']:>8.3f}   {tasks}"
        )
    print(f"\nexported (transformers LLaVA layout, verified): {summary['export']}")
    if "quantized_export" in summary:
        q = summary["quantized_export"]
        print(
            f"exported {q['quantization']['scheme']} (compressed-tensors, verified): {q['dir']}; quantized layers "
            f"{q['size']['quantized_layer_ratio']:.2f} of their bf16 size; greedy agreement with the float model "
            f"{q['quantized_vs_float']['greedy_agreement']}"
        )
    print(
        f"total {summary['seconds']:.0f} s. Try:\n  mmpost generate {summary['stages']['sft']['run']} "
        f"--image {summary['example_image']} --prompt 'What shape is it?'"
    )
