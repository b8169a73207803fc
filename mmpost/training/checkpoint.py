"""Checkpoints: the model in mmpost's format plus optimizer, scheduler, RNG and data position.

::

    RUN/checkpoints/step-N/model/          mmpost model directory (loads with mmpost.load)
    RUN/checkpoints/step-N/trainer.pt      scheduler, loop state, and the optimizer when not sharded
    RUN/checkpoints/step-N/rng-R.pt        RNG states of process R
    RUN/checkpoints/step-N/config.yaml     the resolved run config
    RUN/checkpoints/step-N/sharded/        under FSDP2 / DeepSpeed: each process's shard of model and optimizer
    RUN/checkpoints/step-N/checksums.json  size and SHA-256 of the files above (the model has its own)

What survives what:

- a kill during a save: the checkpoint is written under ``step-N.tmp`` and renamed when complete, so an
  interrupted save never looks like a checkpoint;
- a kill while an old checkpoint is deleted: it is renamed to ``step-N.old`` first, so a half-deleted one
  never keeps a valid name;
- a full disk: the free space is checked before writing (the size is known: the model's and the
  optimizer's tensors), and a write that fails anyway is removed; either way the error says how much space
  the checkpoint needs, and earlier checkpoints stay as they were;
- damaged bytes: ``--resume`` checks every file against the checksums and names the damaged one.
"""

from __future__ import annotations

import errno
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmpost.checksums import DamagedFileError, verify_manifest, write_manifest
from mmpost.config import RunConfig, dump_config

STEP_DIR = re.compile(r"^step-(\d+)$")
LEFTOVER = re.compile(r"^step-\d+\.(tmp|old)$")
MODEL_DIR = "model"


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written (no space left on the device, or another write error)."""


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


def remove_leftovers(run_dir: Path) -> None:
    """Deletes what an interrupted save or deletion left behind (``step-N.tmp``, ``step-N.old``)."""
    folder = Path(run_dir) / "checkpoints"
    if folder.is_dir():
        for path in folder.iterdir():
            if LEFTOVER.match(path.name):
                shutil.rmtree(path, ignore_errors=True)


def discard(path: Path) -> None:
    """Deletes a checkpoint directory by renaming it out of the ``step-N`` namespace first."""
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    path.rename(old)
    shutil.rmtree(old, ignore_errors=True)


def tensor_bytes(*states: Any) -> int:
    """Bytes of the distinct tensors in nested dicts / lists (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    stack = list(states)
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            # a sharded DTensor counts with its whole shape; a plain tensor once per storage (tied weights)
            plain = item.device.type != "meta" and not hasattr(item, "to_local")
            key = item.untyped_storage().data_ptr() if plain else id(item)
            if key not in seen:
                seen.add(key)
                total += item.numel() * item.element_size()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def no_space_message(folder: Path, step: int, needed: int, run_dir: Path) -> str:
    free = shutil.disk_usage(folder).free
    earlier = [p.name for _, p in step_checkpoints(run_dir)]
    kept = f"earlier checkpoints are intact ({', '.join(earlier)}); " if earlier else ""
    return (
        f"no space left on device for checkpoint step-{step} in {folder}: it needs ~{needed / 2**20:.1f} MB, "
        f"{free / 2**20:.1f} MB are free. {kept}free some space (or lower train.keep_checkpoints) and resume "
        "with --resume"
    )


def save_checkpoint(
    run_dir: Path,
    step: int,
    model,
    optimizer: torch.optim.Optimizer,
    scheduler,
    loop_state: dict[str, Any],
    cfg: RunConfig,
    sharding,
    keep: int,
) -> Path:
    """Writes ``checkpoints/step-{step}``: the whole model and the trainer state from the main process, the RNG from
    each, and under sharding each process's shard of the model and optimizer (``mmpost.training.sharding``).
    Every process must call it.

    Raises:
        CheckpointError: when the device is full (before writing, or when a write fails for lack of space);
            the partial write is removed on every process and earlier checkpoints are kept.
    """
    accelerator = sharding.accelerator
    final = Path(run_dir) / "checkpoints" / f"step-{step}"
    tmp = final.with_name(final.name + ".tmp")
    trainer = {"scheduler": scheduler.state_dict(), "loop": loop_state}
    model_bytes, optimizer_bytes = tensor_bytes(model.state_dict()), tensor_bytes(optimizer.state_dict())
    # the whole model, plus (sharded) the shards of model and optimizer, or (not sharded) the optimizer
    needed = model_bytes * (2 if sharding.shards_state else 1) + optimizer_bytes + (1 << 20)
    failure: str | None = None
    if accelerator.is_main_process:
        remove_leftovers(run_dir)
        tmp.mkdir(parents=True)
        if shutil.disk_usage(tmp).free < needed:
            failure = no_space_message(tmp.parent, step, needed, run_dir)
    failure = agree_on_failure(accelerator, failure)
    if failure is None:
        try:
            torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
            sharding.save_whole(model, tmp / MODEL_DIR)
            trainer |= sharding.save_state(tmp, model, optimizer)
            if accelerator.is_main_process:
                torch.save(trainer, tmp / "trainer.pt")
                dump_config(cfg, tmp / "config.yaml")
        except Exception as err:  # noqa: BLE001 - any failed write: remove it, then say why
            failure = describe_write_failure(err, tmp.parent, step, needed, run_dir)
        failure = agree_on_failure(accelerator, failure)  # also: every process has written its files
    if failure is None and accelerator.is_main_process:
        try:
            write_manifest(tmp, skip=(MODEL_DIR,))
        except Exception as err:  # noqa: BLE001
            failure = describe_write_failure(err, tmp.parent, step, needed, run_dir)
    failure = agree_on_failure(accelerator, failure)
    if failure is not None:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        raise CheckpointError(failure)
    if accelerator.is_main_process:
        if final.exists():
            discard(final)
        tmp.rename(final)
        for _, old in step_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            discard(old)
    accelerator.wait_for_everyone()
    return final


def describe_write_failure(err: Exception, folder: Path, step: int, needed: int, run_dir: Path) -> str:
    """Why a checkpoint write failed: a full device (torch's zip writer reports it as "unexpected pos"), or
    the error itself."""
    full = isinstance(err, OSError) and err.errno == errno.ENOSPC
    if full or shutil.disk_usage(folder).free < needed:
        return no_space_message(folder, step, needed, run_dir)
    return f"writing checkpoint step-{step} in {folder} failed: {type(err).__name__}: {err}"


def agree_on_failure(accelerator, failure: str | None) -> str | None:
    """Every process learns whether any process failed, so that all of them stop together."""
    if accelerator.num_processes == 1:
        return failure
    failed = torch.tensor(float(failure is not None), device=accelerator.device)
    if float(accelerator.reduce(failed, "sum")) == 0:
        return None
    return failure or "another process failed to write its part of the checkpoint (see its error)"


def verify_checkpoint(checkpoint: Path) -> None:
    """Checks the checkpoint's files and its model's files against their checksums.

    Raises:
        DamagedFileError: naming the damaged file, and the other checkpoints to resume from instead.
    """
    try:
        verify_manifest(checkpoint, "checkpoint")
        verify_manifest(checkpoint / MODEL_DIR, "checkpoint model")
    except DamagedFileError as err:
        others = [p.name for _, p in step_checkpoints(checkpoint.parent.parent) if p != checkpoint]
        hint = (
            (
                f"; earlier checkpoints: {', '.join(others)} (move {checkpoint.name} aside to resume from the latest "
                "of them)"
            )
            if others
            else ""
        )
        raise DamagedFileError(f"{err}{hint}") from None


def load_trainer_state(checkpoint: Path, process_index: int, processes: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Returns (trainer state, this process's RNG state) of a checkpoint.

    Raises:
        FileNotFoundError: when the checkpoint was written by another number of processes (each process's data
            order and random streams continue only with the same number; under FSDP2 the shards themselves could be
            resharded, but the run would not continue the same loss curve).
        DamagedFileError: naming a file that cannot be read.
    """
    written = len(list(checkpoint.glob("rng-*.pt")))
    if written != processes:
        raise FileNotFoundError(
            f"{checkpoint} was written by {written} process(es) and this run has {processes}: resume with the same "
            "number of processes (the data order and the random streams are per process)"
        )
    rng_file = checkpoint / f"rng-{process_index}.pt"
    return read_torch_file(checkpoint / "trainer.pt"), read_torch_file(rng_file)


def read_torch_file(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - the unpickler raises many kinds on damaged bytes
        raise DamagedFileError(f"{path} cannot be read ({type(err).__name__}: {err}); the file is damaged") from None
