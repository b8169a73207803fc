"""Starting a run: the run directory, the accelerator, resume or ``from:``, and the model the run trains."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import set_seed

from mmpost.config import RunConfig, dump_config
from mmpost.families import HF_PREFIX, from_pretrained
from mmpost.model.build import build_lmm, load_lmm
from mmpost.model.format import resolve_model_dir
from mmpost.model.lmm import LMM
from mmpost.training.accel import make_accelerator
from mmpost.training.changes import changed_settings
from mmpost.training.checkpoint import latest_checkpoint, remove_leftovers, step_checkpoints, verify_checkpoint
from mmpost.training.host_memory import keep_freed_memory
from mmpost.training.sharding import Sharding, requested

log = logging.getLogger("mmpost")


class RunError(RuntimeError):
    """A run that cannot start as configured (existing output, missing checkpoint, bad ``from:``)."""


@dataclass
class RunContext:
    """What every stage's entry point sets up first.

    Attributes:
        cfg: the resolved config.
        run_dir: the run directory.
        accelerator: the run's one accelerator.
        checkpoint: the checkpoint being resumed, or None for a fresh run.
        changes: settings a resume changed from the checkpoint's (``--allow-changes``): key -> (old, new).
        sharding: how the model is spread over the processes (``mmpost.training.sharding``).
    """

    cfg: RunConfig
    run_dir: Path
    accelerator: Accelerator
    checkpoint: Path | None
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    sharding: Sharding | None = None


RUN_FILES = {"config.yaml", "train.log", "metrics.jsonl", "tb", "checkpoints"}


def failed_start(run_dir: Path) -> bool:
    """True for a run directory that holds only what a run writes before its first checkpoint (a start that
    failed, e.g. on a config error found after the directory was made): a rerun may replace it."""
    names = {p.name for p in run_dir.iterdir()}
    return names <= RUN_FILES and not step_checkpoints(run_dir)


def start_run(cfg: RunConfig, resume: bool, allow_changes: bool = False) -> RunContext:
    """Checks the run directory, writes ``config.yaml``, seeds, and creates the accelerator.

    A fresh run refuses a non-empty run directory, except one that a failed start left (``failed_start``),
    which it replaces. A resume checks the latest checkpoint's files against their checksums and the config
    against the checkpoint's (``mmpost.training.changes``).

    Raises:
        RunError: for an empty ``out``, an ``out`` that is a file, a non-empty run directory without
            ``--resume``, or ``--resume`` with no checkpoint to resume from.
        DamagedFileError: naming a checkpoint file whose checksum differs.
        ResumeMismatch: listing the settings that differ from the checkpoint's.
    """
    if not cfg.out:
        raise RunError("out is empty: set the run directory (out: runs/my-run or --set out=...)")
    run_dir = Path(cfg.out)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"out: {run_dir} is a file, not a directory; choose another out")
    checkpoint, changes, replace = None, {}, False
    if allow_changes and not resume:
        raise RunError("--allow-changes applies to resuming only")
    if resume:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise RunError(
                f"--resume: no checkpoint under {run_dir / 'checkpoints'}; set train.save_every to save some"
            )
        verify_checkpoint(checkpoint)
        changes = changed_settings(checkpoint, cfg, allow_changes)
    elif run_dir.exists() and any(run_dir.iterdir()):
        if not failed_start(run_dir):
            raise RunError(f"run directory {run_dir} is not empty: pass --resume to continue it, or choose another out")
        replace = True
    kind = requested(cfg.train.sharding)
    accelerator = make_accelerator(cfg.train, kind)
    sharding = Sharding(kind, accelerator, cfg.train.precision)
    if cfg.train.keep_freed_memory and accelerator.device.type == "cpu":
        keep_freed_memory()
    if accelerator.is_main_process:
        if replace:
            log.info("replacing %s: it holds no checkpoint (an earlier start that failed)", run_dir)
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(run_dir)
        dump_config(cfg, run_dir / "config.yaml")
        for old_handler in [h for h in log.handlers if getattr(h, "mmpost_run_log", False)]:
            log.removeHandler(old_handler)  # an earlier run in this process (the demo, a notebook)
            old_handler.close()
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler.mmpost_run_log = True
        log.addHandler(handler)
        for key, (old, new) in changes.items():
            log.warning("resume with a changed setting (--allow-changes): %s %r -> %r", key, old, new)
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)
    return RunContext(cfg, run_dir, accelerator, checkpoint, changes, sharding)


def build_model(ctx: RunContext) -> LMM:
    """The model to train: from the resumed checkpoint, from ``from:`` (with the ``model`` section's swaps), or
    built from the ``model`` section (``mmpost.model.build``)."""
    if ctx.checkpoint is not None:
        log.info("resuming from %s", ctx.checkpoint)
        return load_lmm(ctx.checkpoint / "model", verify=False)  # start_run checked its checksums
    start = ctx.cfg.from_
    if start is not None:
        start = from_pretrained(start) if start.startswith(HF_PREFIX) else resolve_model_dir(start, what="from")
    return build_lmm(ctx.cfg.model, start)
