"""Run configuration: typed dataclasses read strictly from YAML plus ``--set`` overrides."""

from __future__ import annotations

from pathlib import Path

import yaml

from mmpost.config.loader import ConfigError, apply_overrides, from_dict, read_yaml, to_dict
from mmpost.config.schema import (
    DataConfig,
    DataSourceConfig,
    EvalConfig,
    LLMConfig,
    LoraConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
)

__all__ = [
    "ConfigError",
    "DataConfig",
    "DataSourceConfig",
    "EvalConfig",
    "LLMConfig",
    "LoraConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "dump_config",
    "load_config",
    "to_dict",
]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Reads a run config from YAML (or only overrides when ``path`` is None) and validates it.

    Raises:
        FileNotFoundError: if the YAML file does not exist.
        ConfigError: naming the dotted key of the first unknown key or wrong type.
    """
    data = read_yaml(path) if path is not None else {}
    apply_overrides(data, list(overrides or []))
    where = f"{path}: " if path is not None else ""
    try:
        return from_dict(RunConfig, data)
    except ConfigError as err:
        raise ConfigError(f"{where}{err}") from None


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Writes the resolved config as YAML (atomically: a crash never leaves half a file)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)
