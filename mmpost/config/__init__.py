"""Run configuration: typed dataclasses read strictly from YAML plus ``--set`` overrides."""

from __future__ import annotations

from pathlib import Path

import yaml

from mmpost.config.fields import ConfigError, absolute_paths
from mmpost.config.loader import apply_overrides, from_dict, read_yaml, to_dict
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

    Relative filesystem paths in it are resolved against the current folder, which is what they meant to
    the command that loads it; the config returned names them absolutely, so that the copy a run writes
    (``dump_config``) names the same files when read from another folder.

    Args:
        path: the YAML file.
        overrides: dotlist items, ``train.lr=2e-5``, applied over the file.

    Returns:
        The validated config with absolute paths.

    Raises:
        FileNotFoundError: if the YAML file does not exist.
        ConfigError: naming the file, line and column of a YAML syntax error, the ``--set`` item whose value is
            not YAML, or the dotted key of the first unknown key, wrong type or value out of its range.
    """
    data = read_yaml(path) if path is not None else {}
    apply_overrides(data, list(overrides or []))
    where = f"{path}: " if path is not None else ""
    try:
        cfg = from_dict(RunConfig, data)
    except ConfigError as err:
        raise ConfigError(f"{where}{err}") from None
    return absolute_paths(cfg)


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Writes the resolved config as YAML (atomically: a crash never leaves half a file)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)
