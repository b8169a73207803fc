"""What a resumed run may change: the settings of the checkpoint against the settings of the resume.

A resume continues the checkpoint's loss curve only if what shapes training is what the checkpoint was
trained with. ``--resume`` therefore refuses a config whose training-shaping keys differ from the
checkpoint's ``config.yaml`` and lists them. ``--resume --allow-changes`` accepts the keys in
``ADJUSTABLE`` with these effects, each logged:

- learning rate, per-part rates, weight decay, warmup, schedule, ``max_steps`` / ``epochs``: the optimizer
  keeps its moments and the schedule is rebuilt with the new values, continuing at the checkpoint's step;
- ``batch_size``: the data position is kept in samples (the epoch and the samples already drawn in it);
- ``grad_accum``, ``max_grad_norm``, ``precision``, ``data.max_length`` and the stage's own options: used
  from the next step on.

Keys that cannot change under a checkpoint (the model, which comes from it; ``from``; the seed and the
training data, which fix the data order; what trains, which fixes the optimizer's groups) are refused
even then. Keys that do not shape training (logging, checkpoint and evaluation cadence, workers,
evaluation settings) may always change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmpost.config import RunConfig, load_config, to_dict

FREE = (
    "out",
    "train.log_every",
    "train.save_every",
    "train.keep_checkpoints",
    "train.eval_every",
    "train.gradient_checkpointing",
    "data.num_workers",
    "data.max_bad_fraction",
    "data.eval",
    "eval",
)
ADJUSTABLE = (
    "train.lr",
    "train.part_lr.",
    "train.weight_decay",
    "train.warmup_ratio",
    "train.schedule",
    "train.max_steps",
    "train.epochs",
    "train.batch_size",
    "train.grad_accum",
    "train.max_grad_norm",
    "train.precision",
    "data.max_length",
    "stage.",
)
REASONS = {
    "model.": "the model comes from the checkpoint",
    "from": "the model comes from the checkpoint",
    "seed": "it fixes the data order the checkpoint's position refers to",
    "data.train.": "the checkpoint's data position refers to the old training data",
    "train.trainable": "it fixes the optimizer's parameter groups",
    "stage.name": "a checkpoint continues the stage that wrote it",
}


class ResumeMismatch(ValueError):
    """``--resume`` with settings that differ from the checkpoint's."""


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out |= flatten(value, f"{prefix}{key}.")
        return out
    return {prefix[:-1]: data}


def _matches(key: str, patterns: tuple[str, ...] | dict[str, str]) -> str | None:
    for pattern in patterns:
        if key == pattern or (pattern.endswith(".") and key.startswith(pattern)) or key.startswith(pattern + "."):
            return pattern
    return None


def changed_settings(checkpoint: Path, cfg: RunConfig, allow: bool) -> dict[str, tuple[Any, Any]]:
    """The training-shaping keys whose value differs between the checkpoint's config and ``cfg``.

    Returns:
        ``{dotted key: (old, new)}``; empty when nothing that shapes training changed.

    Raises:
        ResumeMismatch: listing the changed keys and their old and new values, when ``allow`` is False or a
            key cannot change under a checkpoint.
    """
    # read back like any config, so that both sides hold resolved, absolute paths
    old = flatten(to_dict(load_config(checkpoint / "config.yaml")))
    new = flatten(to_dict(cfg))
    diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
    diff = {k: v for k, v in diff.items() if not _matches(k, FREE)}
    if not diff:
        return {}
    lines = [f"  {k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()]
    fixed = {}
    for key, (before, after) in diff.items():
        reason = REASONS.get(_matches(key, REASONS) or "")
        if reason is None and key.startswith("train.part_lr") and (before is None or after is None):
            reason = "adding or removing a part_lr entry changes the optimizer's parameter groups"
        if reason is None and not _matches(key, ADJUSTABLE):
            reason = "it cannot change under a checkpoint"
        if reason is not None:
            fixed[key] = reason
    if fixed:
        why = "\n".join(f"  {k}: {reason}" for k, reason in fixed.items())
        raise ResumeMismatch(
            f"--resume from {checkpoint}: settings differ from the checkpoint's:\n"
            + "\n".join(lines)
            + f"\nthese cannot change when resuming:\n{why}\nrestore them, or start a new run `from:` the checkpoint's "
            "model"
        )
    if not allow:
        raise ResumeMismatch(
            f"--resume from {checkpoint}: settings that shape training differ from the checkpoint's:\n"
            + "\n".join(lines)
            + "\nrestore them to continue the same run, or pass --allow-changes to apply them from "
            "the checkpoint's step on (the schedule is rebuilt with the new values; see `mmpost train --help`)"
        )
    return diff


def rebuild_schedule(optimizer, scheduler, fresh: list[dict[str, float]]) -> None:
    """After loading a checkpoint's optimizer and scheduler: the new learning rates and weight decays, on the
    new schedule, at the checkpoint's step.

    Args:
        fresh: per parameter group, the ``lr`` and ``weight_decay`` the new config gave it.
    """
    for group, new in zip(optimizer.param_groups, fresh, strict=True):
        group["initial_lr"], group["weight_decay"] = new["lr"], new["weight_decay"]
    scheduler.base_lrs = [new["lr"] for new in fresh]
    step = scheduler.last_epoch
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(step)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def convert_position(state, old_batch: int, new_batch: int, processes: int) -> None:
    """Keeps the data position in samples when the per-process batch size changes: the new position is the first
    batch that starts at or before the samples already drawn in this epoch (at most one batch is seen twice).

    Args:
        state: the loop state (``LoopState``) of the resumed checkpoint, changed in place.
    """
    drawn = state.batch * old_batch * processes
    state.batch = drawn // (new_batch * processes)
