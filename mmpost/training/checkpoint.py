"""Checkpoints: the model in mmpost's format plus optimizer, scheduler, RNG and data position.

::

    RUN/checkpoints/step-N/model/         mmpost model directory (loads with mmpost.load)
    RUN/checkpoints/step-N/trainer.pt     optimizer, scheduler, loop state (torch.load weights_only)
    RUN/checkpoints/step-N/rng-R.pt       RNG states of process R
    RUN/checkpoints/step-N/config.yaml    the resolved run config

Each checkpoint is written under ``step-N.tmp`` and renamed when complete, so an interrupted save
never looks like a checkpoint.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmpost.config import RunConfig, dump_config

STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, *rest = state["python"]
    random.setstate((version, tuple(rest[0]), rest[1]))
    kind, keys, *tail = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *tail))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = step_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(
    run_dir: Path,
    step: int,
    model,
    optimizer: torch.optim.Optimizer,
    scheduler,
    loop_state: dict[str, Any],
    cfg: RunConfig,
    accelerator,
    keep: int,
) -> Path:
    """Writes ``checkpoints/step-{step}`` (model and trainer state from the main process, RNG from each)."""
    final = Path(run_dir) / "checkpoints" / f"step-{step}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        model.save(tmp / "model")
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "loop": loop_state},
            tmp / "trainer.pt",
        )
        dump_config(cfg, tmp / "config.yaml")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for _, old in step_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_trainer_state(checkpoint: Path, process_index: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Returns (trainer state, this process's RNG state) of a checkpoint."""
    trainer = torch.load(checkpoint / "trainer.pt", map_location="cpu", weights_only=True)
    rng_file = checkpoint / f"rng-{process_index}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(
            f"{rng_file} is missing: the checkpoint was written by fewer processes; resume with the same number"
        )
    return trainer, torch.load(rng_file, map_location="cpu", weights_only=True)
