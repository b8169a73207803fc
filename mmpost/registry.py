"""Exact-name registries for swappable parts (encoders, connectors, stages).

A registry maps a name to ``"module:Class"`` and imports the module only when the name is used, so
``import mmpost`` does not pay for open_clip, timm or torchaudio until a config asks for them. Names
match exactly: there is no substring or case-insensitive lookup, so ``mlp`` can never resolve to
``mof_mlp``. A duplicate name is an error at registration, and an unknown name lists the valid ones.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any


class RegistryError(KeyError):
    """An unknown or duplicate name in a registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry:
    """Names of one kind of part, each bound to a class imported on first use.

    Args:
        kind: what the registry holds ("encoder", "connector"), used in messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._targets: dict[str, str] = {}

    def add(self, name: str, target: str) -> None:
        """Registers ``name`` for ``target`` ("package.module:ClassName").

        Raises:
            RegistryError: if ``name`` is already registered.
        """
        if name in self._targets:
            raise RegistryError(
                f"{self.kind} {name!r} is registered twice ({self._targets[name]} and {target}); pick another name"
            )
        if ":" not in target:
            raise ValueError(f"registry target must look like 'module:Class', got {target!r}")
        self._targets[name] = target

    def names(self) -> list[str]:
        return sorted(self._targets)

    def __contains__(self, name: object) -> bool:
        return name in self._targets

    def get(self, name: str) -> type:
        """Returns the class registered under ``name``.

        Raises:
            RegistryError: if the name is unknown; the message lists the registered names.
        """
        if name not in self._targets:
            close = difflib.get_close_matches(str(name), self.names(), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RegistryError(f"unknown {self.kind} {name!r}.{hint} Registered: {', '.join(self.names())}")
        module_name, _, attr = self._targets[name].partition(":")
        return getattr(importlib.import_module(module_name), attr)

    def name_of(self, cls: type) -> str:
        """The name ``cls`` is registered under (for writing a saved model's config).

        Raises:
            RegistryError: if ``cls`` is not registered here.
        """
        target = f"{cls.__module__}:{cls.__qualname__}"
        for name, registered in self._targets.items():
            if registered == target:
                return name
        raise RegistryError(f"{target} is not a registered {self.kind}; add it to the registry to save it")

    def build(self, name: str, **kwargs: Any) -> Any:
        """Constructs the part registered under ``name`` with ``kwargs``."""
        return self.get(name)(**kwargs)


# The stages, by name. Each one's module under ``mmpost/stages/`` holds its options dataclass (``Options``, the
# schema of its ``stage:`` keys) and its ``run``; adding a stage is that module and one line here.
STAGES = Registry("stage")
STAGES.add("align", "mmpost.stages.align:Align")
STAGES.add("sft", "mmpost.stages.sft:SFT")
STAGES.add("dpo", "mmpost.stages.dpo.stage:DPO")
STAGES.add("grpo", "mmpost.stages.grpo.stage:GRPO")
STAGES.add("rloo", "mmpost.stages.rloo.stage:RLOO")
STAGES.add("rm", "mmpost.stages.rm.stage:RewardModel")
STAGES.add("ppo", "mmpost.stages.ppo.stage:PPO")
STAGES.add("distill", "mmpost.stages.distill.stage:Distill")

# Position schemes of decoders whose position ids are not 0, 1, 2, ... (``mmpost.model.positions.PositionScheme``).
POSITIONS = Registry("position scheme")
POSITIONS.add("mrope", "mmpost.families.mrope:MRope")
