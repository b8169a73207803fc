"""Stages: one file each, with its options, its loss and what it needs from a batch.

To add one, write a module here with a class whose constructor takes the stage's options and add
one line below. Everything that runs a config builds its stage with ``build_stage``, so that the
options under ``stage:`` reach the stage whichever command runs it.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from mmpost.registry import Registry

if TYPE_CHECKING:
    from mmpost.config import RunConfig

STAGES = Registry("stage")
STAGES.add("align", "mmpost.stages.align:Align")
STAGES.add("sft", "mmpost.stages.sft:SFT")
STAGES.add("dpo", "mmpost.stages.dpo:DPO")
STAGES.add("grpo", "mmpost.stages.grpo:GRPO")
STAGES.add("distill", "mmpost.stages.distill:Distill")


def build_stage(cfg: RunConfig) -> Any:
    """The stage ``cfg.stage`` names, constructed with the options given beside its name.

    Raises:
        RegistryError: if the stage name is unknown.
        ValueError: if the stage rejects its options.
    """
    options = {k: v for k, v in cfg.stage.items() if k != "name"}
    return STAGES.build(cfg.stage["name"], **options)


def stage_options(cfg: RunConfig) -> dict[str, Any]:
    """Every option of the stage ``cfg.stage`` names: the config's values over its constructor's defaults.

    Raises:
        RegistryError: if the stage name is unknown.
    """
    params = inspect.signature(STAGES.get(cfg.stage["name"])).parameters
    defaults = {name: p.default for name, p in params.items() if p.default is not p.empty}
    return defaults | {k: v for k, v in cfg.stage.items() if k != "name"}
