"""What quantization costs a trained model: held-out accuracy, loss and drift from the float model per scheme.

    python tools/quant_eval.py RUN [--schemes w8a16,w4a16-gptq,w4a16-gptq-text,w4a16-awq-g32,w8a8,fp8,sparse24]
                               [--calib-samples 128] [--draws 1] [--eval-samples 300] [--json out.json]

For each scheme the float model of ``RUN`` (a finished run: its ``final/`` and ``config.yaml``) is loaded,
compressed with ``mmpost.quant`` (calibrated methods on the run's training data), and measured on the run's
held-out set (``data.eval``, multimodal):

- ``accuracy``: exact-match accuracy of greedy answers, and its change from the float model in points;
- ``loss``: held-out answer cross-entropy;
- ``kl_to_float``: mean KL(float || quantized) of the next-token distributions over held-out answer tokens;
- ``layer_error`` / ``rtn_error``: mean relative output error of the compressed layers on their calibration
  inputs, the method's weights against round-to-nearest's on the same inputs; for AWQ, whose rounding is
  round-to-nearest of the scaled weights, ``awq_error_vs_rtn`` instead: the mean over the scaled groups of the
  parent block's output error with AWQ's scales over that with plain rounding, on the calibration inputs;
- ``layer_ratio``: bytes of the quantized layers in the saved compressed-tensors checkpoint over the same
  layers in bfloat16.

With ``--draws K`` each calibrated scheme is run K times on K calibration sets (draw 0 the first samples of the
training data, draw d > 0 ``--calib-samples`` of them drawn at random with seed d) and its figures are the mean over
the draws, with their standard deviation (``*_std``) and each draw's KL (``kl_draws``): at small sizes which of two
schemes drifts less can depend on the calibration set.

Scheme names are the export presets; ``-text`` calibrates on the same samples without their media (what
text-only tools do), ``-g<N>`` uses groups of N (``w4a16-awq-g128``), ``-alpha`` searches SmoothQuant's α per layer
(``w8a8-alpha``), ``-modality`` makes the searches weigh each token by its modality's sensitivity and ``-token``
by its own (``balance``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

DEFAULT_SCHEMES = (
    "float,w8a16,w4a16,w4a16-gptq,w4a16-gptq-text,w4a16-awq,w4a16-awq-text,w8a8-rtn,w8a8,w8a8-text,fp8,fp8-kv,"
    "sparse24,sparse24-wanda,sparse24-w4a16"
)


def options_for(name: str, calib_samples: int):
    """A preset with suffixes: ``-text`` (text calibration), ``-g<N>`` (groups of N), ``-alpha`` (SmoothQuant's α
    searched), ``-modality`` (the searches weigh tokens by their modality's sensitivity), ``-token`` (each by its
    own)."""
    import re

    from mmpost.quant import PRESETS

    group = re.search(r"-g(\d+)", name)
    base = re.sub(r"-g\d+|-text|-alpha|-modality|-token", "", name)
    options = replace(PRESETS[base], num_samples=calib_samples)
    if "-text" in name:
        options = replace(options, calibration="text")
    if group:
        options = replace(options, group_size=int(group.group(1)))
    if "-alpha" in name:
        options = replace(options, smoothing_search=True)
    if "-modality" in name:
        options = replace(options, balance="modality")
    if "-token" in name:
        options = replace(options, balance="token")
    return options


def draw(samples: list, index: int, count: int) -> list:
    """Calibration draw ``index``: the first samples for 0, else ``count`` of them at random (seed ``index``)."""
    if index == 0:
        return samples
    import random

    return random.Random(index).sample(samples, min(count, len(samples)))


def mean_over_draws(rows: list[dict]) -> dict:
    """The draws' figures averaged (numbers), with the standard deviation of the measured ones."""
    import statistics

    out = dict(rows[0])
    for key, value in rows[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [r[key] for r in rows]
            out[key] = statistics.fmean(values)
            if key in ("accuracy", "kl_to_float", "loss") and len(rows) > 1:
                out[f"{key}_std"] = statistics.stdev(values)
    if len(rows) > 1:
        out["kl_draws"] = [r["kl_to_float"] for r in rows]
    return out


def held_out_batches(model, cfg, samples) -> dict[str, list]:
    """The held-out samples batched once for every scheme: prompts for accuracy, conversations for loss and KL."""
    from mmpost.data.pipeline import ConversationPipeline, PromptPipeline

    batches = {}
    pipelines = {
        "generate": PromptPipeline.for_model(model, cfg.data.max_length, need_reference=True),
        "train": ConversationPipeline.for_model(model, cfg.data.max_length),
    }
    for kind, pipeline in pipelines.items():
        items = [pipeline.process(s) for s in samples]
        size = cfg.eval.batch_size
        batches[kind] = [pipeline.collate(items[i : i + size]) for i in range(0, len(items), size)]
    return batches


@torch.no_grad()
def measure(model, float_model, cfg, batches: dict[str, list], tasks: list[str], accelerator) -> dict:
    """Held-out accuracy and loss of ``model``, and its KL to ``float_model`` on the answer tokens."""
    from mmpost.losses.distill import token_kl
    from mmpost.training.evaluate import eval_accuracy, eval_loss

    accuracy, _ = eval_accuracy(model, batches["generate"], accelerator, cfg.eval.max_new_tokens, tasks)
    result = {"accuracy": accuracy["eval/accuracy"], "loss": eval_loss(model, batches["train"], accelerator)}
    result |= {f"accuracy/{k.split('/')[-1]}": v for k, v in accuracy.items() if k.count("/") == 2}
    kl_sum, tokens = 0.0, 0
    for batch in batches["train"]:
        batch = batch.to(accelerator.device)
        args = (batch.input_ids, batch.attention_mask, batch.media, batch.labels)
        p = float_model(*args).logits.log_softmax(-1)
        q = model(*args).logits.log_softmax(-1)
        kl_sum += float(token_kl(p, q).sum())
        tokens += p.shape[0]
    result["kl_to_float"] = kl_sum / max(tokens, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a finished run directory (final/ and config.yaml)")
    parser.add_argument("--schemes", default=DEFAULT_SCHEMES, help=f"comma-separated (default: {DEFAULT_SCHEMES})")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--draws", type=int, default=1, help="calibration sets per calibrated scheme (default 1)")
    parser.add_argument("--eval-samples", type=int, default=300)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    from accelerate import Accelerator

    from mmpost.cli import quiet_libraries
    from mmpost.config import load_config
    from mmpost.data.loader import read_source
    from mmpost.model.build import load_lmm
    from mmpost.model.compressed import disk_sizes
    from mmpost.model.format import resolve_model_dir
    from mmpost.quant import calibration_samples, quantize

    quiet_libraries()
    torch.manual_seed(0)
    run = Path(args.run)
    final = resolve_model_dir(run)
    cfg = load_config(run / "config.yaml")
    held_out = read_source(cfg.data.eval, "data.eval")[: args.eval_samples]
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    float_model = load_lmm(final).eval().to(accelerator.device)
    batches = held_out_batches(float_model, cfg, held_out)
    tasks = sorted({str(s.meta.get("task", "")) for s in held_out} - {""})
    rows = {}
    for name in args.schemes.split(","):
        options = None if name == "float" else options_for(name, args.calib_samples)
        draws = args.draws if options is not None and options.calibrated else 1
        samples = calibration_samples(options, None, final) if options is not None and options.calibrated else None
        runs = []
        for index in range(draws):
            model = load_lmm(final).eval().to(accelerator.device)
            row: dict = {}
            if options is not None:
                chosen = draw(samples, index, args.calib_samples) if samples else None
                report = quantize(model, options, chosen, progress=False).summary()
                row |= {"scheme": report["scheme"], "seconds": report["seconds"]}
                if "awq_error_vs_rtn" in report:  # AWQ rounds its scaled weights: the gain is in the scales
                    row["awq_error_vs_rtn"] = report["awq_error_vs_rtn"]
                elif "mean_error" in report:
                    row |= {"layer_error": report["mean_error"], "rtn_error": report.get("mean_error_rtn")}
                with tempfile.TemporaryDirectory() as tmp:
                    model.save(Path(tmp) / "q")
                    row["layer_ratio"] = disk_sizes(Path(tmp) / "q")["quantized_layer_ratio"]
            row |= measure(model, float_model, cfg, batches, tasks, accelerator)
            if "float" in rows:
                row["accuracy_change_points"] = 100 * (row["accuracy"] - rows["float"]["accuracy"])
            runs.append(row)
            if draws > 1:
                print(f"{name:<18} draw {index}: kl_to_float {row['kl_to_float']:.4g}  accuracy {row['accuracy']:.4g}")
        rows[name] = row = mean_over_draws(runs)
        shown = "  ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k != "kl_draws"
        )
        print(f"{name:<18} {shown}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
