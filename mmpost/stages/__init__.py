"""Stages: one module (or package, when it has pieces of its own) each, with its options, its loss and what it
needs from a batch. The names are in ``mmpost.registry.STAGES``; everything that runs a config builds its stage
with ``build_stage``, so the options under ``stage:`` reach the stage whichever command runs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mmpost.config import to_dict
from mmpost.registry import STAGES

if TYPE_CHECKING:
    from mmpost.config import RunConfig


def build_stage(cfg: RunConfig) -> Any:
    """The stage ``cfg.stage`` names, with its options (validated when the config was loaded)."""
    return STAGES.get(cfg.stage.name)(cfg.stage)


def stage_options(cfg: RunConfig) -> dict[str, Any]:
    """Every option of the config's stage, defaults filled in (without its name)."""
    return {k: v for k, v in to_dict(cfg.stage).items() if k != "name"}
