"""Small helpers shared by test modules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from mmpost.data.pipeline import ConversationPipeline, PairPipeline, PromptPipeline


def write_run_config(folder: Path, synth_dir: Path, llm_dir: Path, clip_dir: Path, name: str, **sections: Any) -> Path:
    """Writes ``folder/name.yaml``: a tiny run (align on captions by default, output in ``folder/name``); each
    keyword replaces a top-level key, or updates it when both are mappings."""
    cfg: dict[str, Any] = {
        "stage": "align",
        "out": str(folder / name),
        "seed": 0,
        "model": {
            "llm": {"path": str(llm_dir)},
            "encoders": {"image": {"name": "hf_vision", "path": str(clip_dir)}},
            "connectors": {"image": {"name": "mlp", "depth": 2}},
        },
        "data": {
            "train": {"path": str(synth_dir / "align.json"), "image_root": str(synth_dir / "images")},
            "eval": {"path": str(synth_dir / "heldout.jsonl"), "image_root": str(synth_dir / "images")},
            "max_length": 128,
            "num_workers": 0,
        },
        "train": {"lr": 3e-3, "batch_size": 8, "max_steps": 6, "log_every": 1, "warmup_ratio": 0.0},
        "eval": {"max_samples": 8, "batch_size": 8, "max_new_tokens": 3},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


PIPELINES = {
    "conversation": ConversationPipeline.for_model,
    "prompt": PromptPipeline.for_model,
    "reference": lambda model, max_length: PromptPipeline.for_model(model, max_length, need_reference=True),
    "pair": PairPipeline.for_model,
}


def make_batch(model, samples, kind: str = "conversation"):
    """A collated batch of ``samples`` for ``model`` through the real data pipeline (no DataLoader).

    Args:
        kind: ``conversation``, ``prompt``, ``reference`` (prompts of samples with a final answer) or ``pair``.
    """
    pipeline = PIPELINES[kind](model, 512)
    return pipeline.collate([pipeline.process(s) for s in samples])


def greedy_without_cache(model, batch, steps: int) -> torch.Tensor:
    """Greedy decoding by a full forward over the growing sequence at every step (no KV cache); media
    placeholders are never generated, as in ``LMM.generate``."""
    ids, mask = batch.input_ids, batch.attention_mask
    new = []
    for _ in range(steps):
        logits = model(ids, mask, batch.media).dense()[:, -1]
        logits[:, list(model.placeholder_ids.values())] = float("-inf")
        token = logits.argmax(-1, keepdim=True)
        new.append(token)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return torch.cat(new, 1)


def torchrun(*args: str, port: int) -> list[str]:
    """The command that runs ``python -m mmpost ARGS`` in two processes with torchrun on ``port``."""
    import sys

    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        "-m",
        "mmpost",
        *args,
    ]
