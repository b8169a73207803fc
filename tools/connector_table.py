"""Held-out accuracy of every connector with several encoder families, for images and audio.

Writes the synthetic data (shapes and tones), a tiny LLM and tiny encoders of each family (each
pretrained for a few hundred steps on freshly drawn media, standing in for its real pretraining),
then for every row builds the model in Python, saves it, and runs ``align`` and ``sft`` from
YAML files written next to it (``OUT/rows/<row>/{align,sft}.yaml``, runnable with ``mmpost train``).
Held-out accuracy is measured after sft on 300 questions of that row's modality.

    python tools/connector_table.py --out runs/table --readme README.md
    python tools/connector_table.py --out runs/table --rows image-clip-qformer,audio-whisper-xattn

``--readme`` replaces the table between the ``connector-table`` markers in that file; results are
also kept in ``OUT/table.json`` (rows already there are not run again unless ``--rerun``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

log = logging.getLogger("mmpost")

# Tiny encoders (width 64) that the rows use; "pretrain" names the synthetic media they are fit on.
ENCODER_SPECS: dict[str, dict[str, Any]] = {
    "clip": {"name": "hf_vision", "feature_layer": -1},  # path filled in: a tiny CLIP saved by make_tiny_clip
    "timm": {
        "name": "timm",
        "model": "vit_tiny_patch16_224",
        "model_kwargs": {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4},
    },
    "whisper": {
        "name": "whisper",
        "config": {
            "d_model": 64,
            "encoder_layers": 2,
            "encoder_attention_heads": 4,
            "encoder_ffn_dim": 128,
            "num_mel_bins": 80,
            "max_source_positions": 100,
        },
    },
    "wav2vec2": {"name": "wav2vec2"},  # config filled in: mmpost.synthetic.tiny_audio.tiny_speech_config
}
CONNECTOR_SPECS: dict[str, dict[str, Any]] = {
    "linear": {"name": "linear"},
    "mlp": {"name": "mlp", "depth": 2},
    "qformer": {
        "name": "qformer",
        "num_queries": 16,
        "hidden_size": 64,
        "layers": 2,
        "heads": 4,
        "cross_attention_frequency": 1,
        "dropout": 0.0,
    },
    "resampler": {"name": "resampler", "num_latents": 16, "layers": 2, "heads": 4},
    "xattn": {"name": "xattn", "every": 2, "heads": 4, "num_latents": 16, "resampler_layers": 2, "resampler_heads": 4},
}


@dataclass
class Row:
    name: str
    parts: dict[str, tuple[str, str]]  # modality -> (encoder key, connector key)
    data: str  # "image", "audio" or "mixed": which files it trains and is evaluated on
    sft_epochs: int = 2


ROWS = [
    *(Row(f"image-clip-{c}", {"image": ("clip", c)}, "image") for c in CONNECTOR_SPECS),
    *(Row(f"image-timm-{c}", {"image": ("timm", c)}, "image") for c in ("mlp", "xattn")),
    *(Row(f"audio-whisper-{c}", {"audio": ("whisper", c)}, "audio") for c in ("mlp", "qformer", "xattn")),
    *(Row(f"audio-wav2vec2-{c}", {"audio": ("wav2vec2", c)}, "audio") for c in ("mlp", "qformer", "xattn")),
    # six tasks over two media, and the audio connector first trains in sft (align reads captions of images)
    Row("image+audio-clip+whisper-mlp", {"image": ("clip", "mlp"), "audio": ("whisper", "mlp")}, "mixed", sft_epochs=4),
]
# (align file, sft file, held-out file) under the data directory; None: no align stage
DATA = {
    "image": ("align.json", "sft.json", "heldout.jsonl"),
    "audio": ("audio_align.json", "audio_sft.json", "audio_heldout.jsonl"),
    "mixed": ("align.json", "mixed_sft.json", "mixed_heldout.jsonl"),
}
MARKERS = ("<!-- connector-table:start -->", "<!-- connector-table:end -->")


def build_base(out: Path) -> None:
    """Synthetic data and the tiny LLM (tokenizer trained on all of the data's text)."""
    from mmpost.data.sources import read_records
    from mmpost.synthetic.tiny_llm import make_tiny_llm, make_tiny_tokenizer
    from mmpost.synthetic.write import synthesize

    data = out / "data"
    if not (data / "synth.json").is_file():
        synthesize(data, num_train=4000, num_heldout=300, image_size=64, modalities=("image", "audio"))
    if not (out / "llm" / "config.json").is_file():
        names = ("align.json", "sft.json", "audio_align.json", "audio_sft.json", "mixed_sft.json")
        samples = [s for name in names for s in read_records(data / name, **image_root(data, name))]
        texts = [message["content"] for sample in samples for message in sample.messages]
        tokenizer = make_tiny_tokenizer(out / "llm", texts)
        make_tiny_llm(out / "llm", tokenizer, hidden_size=128, layers=4, heads=4, kv_heads=2, intermediate_size=384)


def pretrained_encoder(out: Path, key: str):
    """The tiny encoder ``key``, pretrained once on synthetic media and cached under ``OUT/encoders``."""
    from mmpost.encoders import ENCODERS
    from mmpost.synthetic.pretrain import draw_beeps, draw_shapes, pretrain_encoder
    from mmpost.synthetic.tiny_audio import tiny_speech_config
    from mmpost.synthetic.tiny_vision import make_tiny_clip

    spec = dict(ENCODER_SPECS[key])
    if key == "clip":
        spec["path"] = str(out / "encoders" / "clip")
        if not (out / "encoders" / "clip" / "config.json").is_file():
            make_tiny_clip(spec["path"], image_size=64, patch_size=8, hidden_size=64, layers=2, heads=4)
    if key == "wav2vec2":
        spec["config"] = tiny_speech_config("wav2vec2")
    encoder = ENCODERS.build(**spec)
    weights = out / "encoders" / f"{key}.pt"
    if weights.is_file():
        encoder.load_state_dict(torch.load(weights, weights_only=True))
        return encoder.eval(), json.loads(weights.with_suffix(".json").read_text())
    draw, classes = draw_beeps() if encoder.modality == "audio" else draw_shapes(64)
    started = time.perf_counter()
    scores = pretrain_encoder(encoder, draw, classes, steps=600)
    info = {"pretrain_seconds": round(time.perf_counter() - started, 1), "pretrain_accuracy": scores}
    log.info("%s pretrained in %.0f s: %s", key, info["pretrain_seconds"], scores)
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save(encoder.state_dict(), weights)
    weights.with_suffix(".json").write_text(json.dumps(info))
    return encoder, info


def stage_config(out: Path, row: Row, stage: str) -> dict[str, Any]:
    data = out / "data"
    align_file, sft_file, heldout = DATA[row.data]
    run = out / "rows" / row.name
    train_file = align_file if stage == "align" else sft_file
    train = {"path": str(data / train_file), **image_root(data, train_file)}
    evaluate = {"path": str(data / heldout), **image_root(data, heldout)}
    cfg: dict[str, Any] = {
        "stage": stage,
        "out": str(run / stage),
        "from": str(run / ("base" if stage == "align" else "align")),
        "seed": 0,
        "data": {"train": train, "max_length": 256, "num_workers": 1},
        "train": {
            "trainable": ["connectors"] if stage == "align" else ["connectors", "llm"],
            "lr": 1.0e-3,
            "batch_size": 16,
            "epochs": 1 if stage == "align" else row.sft_epochs,
            "warmup_ratio": 0.03,
            "log_every": 50,
        },
    }
    if stage == "sft":
        cfg["data"]["eval"] = evaluate
        cfg["eval"] = {"max_samples": 300, "batch_size": 32, "max_new_tokens": 4}
    return cfg


def image_root(data: Path, name: str) -> dict[str, str]:
    """The image-only files keep LLaVA's layout (refs relative to images/); the others are relative to data/."""
    return {"image_root": str(data / "images")} if name in ("align.json", "sft.json", "heldout.jsonl") else {}


def run_row(out: Path, row: Row) -> dict[str, Any]:
    import mmpost
    from mmpost.config import load_config
    from mmpost.stages import build_stage

    run = out / "rows" / row.name
    shutil.rmtree(run, ignore_errors=True)  # a row runs from scratch (--rerun, or after an interruption)
    encoders, connectors, pretrain = {}, {}, {}
    for modality, (encoder_key, connector_key) in row.parts.items():
        encoders[modality], pretrain[encoder_key] = pretrained_encoder(out, encoder_key)
        connectors[modality] = mmpost.connector(**CONNECTOR_SPECS[connector_key])
    torch.manual_seed(0)
    mmpost.LMM(str(out / "llm"), encoders, connectors).save(run / "base")
    result: dict[str, Any] = {"row": row.name, "pretrain": pretrain, "stages": {}}
    for stage in ("align", "sft"):
        path = run / f"{stage}.yaml"
        path.write_text(yaml.safe_dump(stage_config(out, row, stage), sort_keys=False))
        cfg = load_config(path)
        outcome = build_stage(cfg).run(cfg)
        result["stages"][stage] = {"steps": outcome["steps"], "seconds": round(outcome["seconds"], 1)}
    after = outcome["eval_after"] or {}
    result["accuracy"] = after.get("eval/accuracy")
    result["per_task"] = {k.split("/")[-1]: v for k, v in after.items() if k.startswith("eval/accuracy/")}
    tokens = {m: connectors[m].num_tokens(encoders[m].num_tokens(sample_shape(encoders[m]))) for m in row.parts}
    result["tokens"] = tokens
    return result


def sample_shape(encoder) -> tuple[int, ...]:
    """The processed shape of a typical medium (a 64 px image, a 1.5 s clip) for the token column."""
    from PIL import Image

    from mmpost.interfaces import Audio

    raw = Audio(torch.zeros(24000), 16000) if encoder.modality == "audio" else Image.new("RGB", (64, 64))
    return tuple(encoder.preprocessor()(raw).shape)


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| model (modality-encoder-connector) | tokens per medium | align + sft steps | CPU time | held-out accuracy "
        "| per task |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        steps = " + ".join(str(r["stages"][s]["steps"]) for s in ("align", "sft"))
        seconds = sum(r["stages"][s]["seconds"] for s in ("align", "sft"))
        tokens = ", ".join(f"{m} {n}" for m, n in r["tokens"].items())
        tasks = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["per_task"].items()))
        lines.append(
            f"| {r['row']} | {tokens} | {steps} | {seconds / 60:.1f} min | **{r['accuracy']:.3f}** | {tasks} |"
        )
    return "\n".join(lines)


def update_readme(path: Path, table: str) -> None:
    text = path.read_text()
    start, end = text.index(MARKERS[0]) + len(MARKERS[0]), text.index(MARKERS[1])
    path.write_text(text[:start] + "\n" + table + "\n" + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/table"))
    parser.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    parser.add_argument("--rerun", action="store_true", help="run rows again even if OUT/table.json has them")
    parser.add_argument("--readme", type=Path, help="replace the table between the connector-table markers")
    args = parser.parse_args()
    from mmpost.cli import quiet_libraries

    quiet_libraries()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    wanted = [r for r in ROWS if not args.rows or r.name in args.rows.split(",")]
    unknown = set(filter(None, args.rows.split(","))) - {r.name for r in ROWS}
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; known: {', '.join(r.name for r in ROWS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    build_base(args.out)
    table_file = args.out / "table.json"
    done = {r["row"]: r for r in json.loads(table_file.read_text())} if table_file.is_file() else {}
    for row in wanted:
        if row.name in done and not args.rerun:
            continue
        started = time.perf_counter()
        done[row.name] = run_row(args.out, row) | {"wall_seconds": round(time.perf_counter() - started, 1)}
        log.info("%s: held-out accuracy %.3f", row.name, done[row.name]["accuracy"])
        table_file.write_text(json.dumps([done[r.name] for r in ROWS if r.name in done], indent=2))
    results = [done[r.name] for r in ROWS if r.name in done]
    table = markdown(results)
    print(table)
    if args.readme:
        update_readme(args.readme, table)


if __name__ == "__main__":
    main()
