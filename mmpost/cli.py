"""The ``mmpost`` command: train, demo, data synth, generate, export, distill-data, plan, config.

Errors a user can fix (config, data, paths, launch) print one ``mmpost: error: ...`` line and exit
with status 2; anything else is a bug and keeps its traceback. A run stopped by SIGTERM or SIGINT
writes a checkpoint, prints one line naming it and exits with 128 + the signal number (143, 130).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that describe something the user can fix; ValueError covers ConfigError, DataError and
    bad part arguments. Set MMPOST_DEBUG=1 to see their tracebacks too."""
    from mmpost.registry import RegistryError
    from mmpost.training.accel import LaunchError
    from mmpost.training.checkpoint import CheckpointError
    from mmpost.training.context import RunError

    return (
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        ValueError,
        FloatingPointError,
        RegistryError,
        RunError,
        LaunchError,
        CheckpointError,
    )


def _overrides(values: list[list[str]] | None) -> list[str]:
    return [item for group in values or [] for item in group]


def cmd_train(args: argparse.Namespace) -> int:
    from mmpost.config import load_config
    from mmpost.stages import build_stage

    if args.allow_changes and not args.resume:
        raise ValueError("--allow-changes applies to --resume only")
    cfg = load_config(args.config, _overrides(args.set))
    summary = build_stage(cfg).run(cfg, resume=args.resume, allow_changes=args.allow_changes)
    if int(os.environ.get("RANK", "0")) == 0:
        after = summary["eval_after"] or {}
        shown = {k: round(v, 4) for k, v in after.items() if k.startswith("eval/")}
        print(f"{summary['stage']}: {summary['steps']} steps in {summary['seconds']} s; {shown}")
        print(f"model: {summary['final']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mmpost.demo import run_demo

    run_demo(Path(args.out), force=args.force, quick=args.quick, stages=args.stages)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from mmpost.synthetic.write import synthesize

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise FileExistsError(f"--out {args.out} is a file; name a directory for the data")
    modalities = [m.strip() for m in args.modalities.split(",") if m.strip()]
    manifest = synthesize(
        args.out,
        num_train=args.train,
        num_heldout=args.heldout,
        image_size=args.image_size,
        seed=args.seed,
        modalities=modalities,
    )
    print(f"wrote {manifest['counts']} to {args.out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from mmpost.generate import answer

    print(answer(args.model, args.prompt, args.image or [], args.max_new_tokens, audios=args.audio or []))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from mmpost.config.schema import DataSourceConfig
    from mmpost.export import export, read_report

    calib = args.calib
    if calib and args.calib_image_root:
        calib = DataSourceConfig(path=calib, image_root=args.calib_image_root)
    export(
        args.model,
        args.out,
        fmt=args.format,
        force=args.force,
        quantize=args.quantize,
        calib=calib,
        llama_cpp=args.llama_cpp,
    )
    report = read_report(args.out)
    reload, size = report["reload"], report["size"]
    print(
        f"exported {args.format} to {args.out}: reloaded with max |logit difference| "
        f"{reload['max_abs_logit_diff']:.3g} and greedy agreement {reload['greedy_agreement']}; "
        f"{size['bytes_on_disk'] / 2**20:.1f} MiB on disk"
    )
    if "quantization" in report:
        quant, moved = report["quantization"], report["quantized_vs_float"]
        ratio = size["quantized_layer_ratio"]
        print(
            f"quantized {quant['layers']} layers, {quant['scheme']}: quantized layers take {ratio} of their "
            f"bf16 size; vs the float model max |logit difference| {moved['max_abs_logit_diff']:.3g}, greedy "
            f"agreement {moved['greedy_agreement']}"
        )
    if "engine" in report:
        engine = report["engine"]
        if engine["engine"] is None:
            print(f"not run by llama.cpp: {engine['not_run']}")
        else:
            print(f"{engine['engine']} answers the probes as the model does: {engine['greedy_agreement']}")
    return 0


def cmd_distill_data(args: argparse.Namespace) -> int:
    from mmpost.config.schema import DataSourceConfig
    from mmpost.distill_data import write_teacher_answers

    source = DataSourceConfig(path=args.data, image_root=args.image_root)
    counts = write_teacher_answers(
        args.teacher,
        source,
        args.out,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        temperature=args.temperature,
        max_samples=args.max_samples,
    )
    print(
        f"wrote {counts['written']} teacher answers to {args.out} ({counts['skipped']} prompts skipped, "
        f"{counts['empty']} empty answers dropped); train a student on it: data.train.path={args.out}"
    )
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from mmpost.config import load_config
    from mmpost.plan import print_plan

    print_plan(load_config(args.config, _overrides(args.set)), args.gpus, args.sharding)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from mmpost.config import RunConfig, load_config, to_dict
    from mmpost.config.loader import describe, describe_registry

    if args.action == "keys":
        from mmpost.quant import QuantizeOptions

        print("\n".join(describe(RunConfig)))
        print("\nexport --quantize FILE.yaml (keys of the file):")
        print("\n".join(describe(QuantizeOptions)))
        for registry in ("stages", "encoders", "connectors"):
            print()
            print("\n".join(describe_registry(registry)))
    else:
        if not args.config:
            raise ValueError("mmpost config show needs a config file")
        print(yaml.safe_dump(to_dict(load_config(args.config, _overrides(args.set))), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmpost", description="Post-training for large multimodal models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run one stage from a YAML config")
    p.add_argument("config", help="YAML run config (see `mmpost config keys`)")
    p.add_argument("--set", nargs="+", action="append", metavar="KEY=VALUE", help="override keys: train.lr=2e-5")
    p.add_argument("--resume", action="store_true", help="continue the run in `out` from its latest checkpoint")
    p.add_argument(
        "--allow-changes",
        action="store_true",
        help="with --resume: apply settings that differ from the checkpoint's from its step on (the "
        "learning-rate schedule is rebuilt with the new values; a new batch size keeps the data "
        "position in samples); without it such a resume is refused",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="synthetic data + tiny models: align, sft, evaluate, export (CPU, offline)")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--force", action="store_true", help="replace a previous demo in --out")
    p.add_argument(
        "--stages",
        choices=["sft", "all", "rlhf"],
        default="sft",
        help="sft: align and sft (default); all: then dpo, grpo from a short sft run, distill "
        "into a smaller LLM, and an int4 GPTQ export; rlhf: align, sft, a reward model (rm) on preference "
        "pairs, and ppo from a short sft run driven by that reward model",
    )
    p.add_argument("--quick", action="store_true", help="a few steps on a sliver of the data: checks the install")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("data", help="data tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    s = data_sub.add_parser("synth", help="write the built-in synthetic dataset (shapes, tones: captions, questions)")
    s.add_argument("--out", required=True)
    s.add_argument("--train", type=int, default=4000, help="training images (and clips)")
    s.add_argument("--heldout", type=int, default=300, help="held-out images (and clips), one question each")
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--modalities", default="image", help="comma-separated: image, audio, or image,audio (adds mixed samples)"
    )
    s.set_defaults(func=cmd_synth)

    p = sub.add_parser("generate", help="answer a prompt about media with a saved model")
    p.add_argument("model", help="a saved model directory, a run (its final/), or hf:PATH (a released checkpoint)")
    p.add_argument("--image", action="append", help="image file (repeat for several); prepended as <image>")
    p.add_argument("--audio", action="append", help="wav / flac file (repeat for several); prepended as <audio>")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "export", help="write a model for serving (mmpost format, transformers' layouts, or GGUF for llama.cpp)"
    )
    p.add_argument("model", help="a saved model directory, a run (its final/), or hf:PATH (a released checkpoint)")
    p.add_argument("--format", choices=["hf", "mmpost", "gguf"], default="mmpost")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="write into a non-empty --out, replacing it")
    p.add_argument(
        "--quantize",
        metavar="SCHEME",
        help="quantize the LLM first: w8a16, w4a16 (round to nearest), w8a16-gptq, w4a16-gptq, or a YAML "
        "file of quantize keys (configs/quant/); written in the compressed-tensors format. With --format gguf: "
        "f16 (default), q8_0 or q4_k_m (llama.cpp's llama-quantize)",
    )
    p.add_argument(
        "--calib",
        metavar="DATA",
        help="gptq calibration data: .json / .jsonl, shards, or a run config (default: the run's training data)",
    )
    p.add_argument("--calib-image-root", metavar="DIR", help="folder the --calib file's media paths are relative to")
    p.add_argument(
        "--llama-cpp",
        metavar="DIR",
        help="--format gguf: a llama.cpp build's bin folder (llama-server checks the export, llama-quantize "
        "makes q4_k_m); default $MMPOST_LLAMA_CPP, else PATH",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("distill-data", help="let a teacher answer prompts and write the answers as sft data")
    p.add_argument("teacher", help="the teacher: a saved model directory or a run")
    p.add_argument(
        "--data",
        required=True,
        help="prompts: .json / .jsonl (LLaVA or messages records) or shards; "
        "a final assistant turn is replaced by the teacher's answer",
    )
    p.add_argument("--image-root", help="folder the data's media paths are relative to (default: the file's)")
    p.add_argument("--out", required=True, help="the .jsonl file to write (messages records)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0, help="0 answers greedily; above 0 samples")
    p.add_argument("--max-samples", type=int, default=0, help="answer at most this many prompts (0: all)")
    p.set_defaults(func=cmd_distill_data)

    p = sub.add_parser("plan", help="per-GPU memory of a run, from the model configs (no weights are loaded)")
    p.add_argument("config", help="YAML run config")
    p.add_argument("--gpus", type=int, default=1, help="processes the run is spread over")
    p.add_argument("--sharding", choices=["ddp", "fsdp2", "zero2", "zero3"], default="fsdp2")
    p.add_argument("--set", nargs="+", action="append", metavar="KEY=VALUE", help="override keys: train.batch_size=4")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("config", help="list every config key with its documentation, or show a resolved config")
    p.add_argument("action", choices=["keys", "show"])
    p.add_argument("config", nargs="?")
    p.add_argument("--set", nargs="+", action="append", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_config)
    return parser


def quiet_libraries() -> None:
    """Keep the console for mmpost's own progress: no per-file load bars or advisory warnings."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    quiet_libraries()
    from mmpost.training.interrupt import Interrupted

    try:
        return args.func(args)
    except Interrupted as stop:
        if rank == 0:
            print(f"mmpost: {stop}", file=sys.stderr)
        return stop.exit_code
    except user_errors() as err:
        if os.environ.get("MMPOST_DEBUG"):
            raise
        print(f"mmpost: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
