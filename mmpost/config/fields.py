"""Field kinds of the config schema that the loader treats specially: numeric keys with a range
(``ranged``), checked at load, and filesystem paths (``path_field``), made absolute at load so that a
resolved config written into a run directory means the same files from any folder.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any

MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A config that cannot be used; the message names the dotted key."""


@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds of a numeric key; a bound left None is open. Prints as ``>= 1``, ``> 0`` or ``in [0, 1)``."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __post_init__(self) -> None:
        if (self.ge is not None and self.gt is not None) or (self.le is not None and self.lt is not None):
            raise ValueError("a range takes at most one lower bound (ge or gt) and one upper bound (le or lt)")
        if self.ge is None and self.gt is None and self.le is None and self.lt is None:
            raise ValueError("a range needs a bound")

    def contains(self, value: float) -> bool:
        # Written as "inside" tests so that NaN, which compares false with everything, is outside.
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def __str__(self) -> str:
        low = (">=", self.ge) if self.ge is not None else (">", self.gt) if self.gt is not None else None
        high = ("<=", self.le) if self.le is not None else ("<", self.lt) if self.lt is not None else None
        if low and high:
            opening, closing = "[" if low[0] == ">=" else "(", "]" if high[0] == "<=" else ")"
            return f"in {opening}{_number(low[1])}, {_number(high[1])}{closing}"
        op, bound = low or high
        return f"{op} {_number(bound)}"


def _number(x: float | None) -> str:
    return str(int(x)) if x is not None and float(x).is_integer() else repr(x)


def ranged(
    default: Any = MISSING,
    *,
    default_factory: Any = MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A numeric dataclass field with its allowed range, checked at load and shown by ``describe``.

    For a ``dict`` of numbers each value is checked; a null value of an optional key is always allowed.

    Args:
        default: the default value.
        default_factory: makes the default (for a dict default).
        ge: the value must be >= this.
        gt: the value must be > this.
        le: the value must be <= this.
        lt: the value must be < this.
    """
    return dataclasses.field(
        default=default, default_factory=default_factory, metadata={"range": Range(ge=ge, gt=gt, le=le, lt=lt)}
    )


def path_field(default: Any = MISSING, *, if_exists: bool = False) -> Any:
    """A string dataclass field that names a file or folder; made absolute when the config is loaded.

    Args:
        default: the default value (empty or null means unset and stays so).
        if_exists: the value may also be something other than a local path (a hub id, template text), so
            it is made absolute only when it names an existing file or folder.
    """
    return dataclasses.field(default=default, metadata={"path": "if_exists" if if_exists else "always"})


# Constructor arguments of registered encoders and connectors that name files (``path`` / ``weights``; stages
# mark theirs with ``path_field``). Parts' constructors are their schema and carry no field
# metadata, so the names are listed here; a value is changed only when it names an existing local path,
# so the same key holding a hub id or anything else is left alone.
PART_PATH_KEYS = ("path", "weights")

# Prefixes of path values that are not plain filesystem paths: mmpost.weights' package paths and
# webdataset's shell pipes (URLs are recognised by their ``://``).
_NOT_FILESYSTEM = ("pkg:", "pipe:")
# ``from: hf:PATH``: a released transformers checkpoint (``mmpost.families.HF_PREFIX``)
RELEASED_PREFIX = "hf:"


def absolute_path(value: str, if_exists: bool = False) -> str:
    """``value`` made absolute against the current folder, with ``~`` expanded.

    Args:
        value: a path as written in a config.
        if_exists: change ``value`` only when it names an existing file or folder.

    Returns:
        The absolute path; ``value`` itself when it is empty, a ``pkg:`` path, a URL, a pipe, or (with
        ``if_exists``) names nothing that exists.
    """
    if not value or value.startswith(_NOT_FILESYSTEM) or "://" in value:
        return value
    if value.startswith(RELEASED_PREFIX):  # from: hf:PATH, a released checkpoint's folder or hub id
        return RELEASED_PREFIX + absolute_path(value[len(RELEASED_PREFIX) :], if_exists=True)
    expanded = os.path.expanduser(value)
    # os.path.exists, not Path.exists: template text can be too long for a file name, which Path raises on.
    if if_exists and not os.path.exists(expanded):
        return value
    return os.path.abspath(expanded)


def absolute_paths(cfg: Any) -> Any:
    """A copy of dataclass config ``cfg`` whose path fields (``path_field``), and file arguments of its
    registered parts (``PART_PATH_KEYS``), are absolute; see ``absolute_path``."""
    changes: dict[str, Any] = {}
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        mode = field.metadata.get("path")
        if mode is not None and isinstance(value, str):
            changes[field.name] = absolute_path(value, if_exists=mode == "if_exists")
        elif dataclasses.is_dataclass(value):  # a section, or a stage's options
            changes[field.name] = absolute_paths(value)
        elif field.metadata.get("registry") is not None and value is not None:
            if field.metadata["many"]:
                changes[field.name] = {k: _absolute_part_paths(part) for k, part in value.items()}
            else:
                changes[field.name] = _absolute_part_paths(value)
    return dataclasses.replace(cfg, **changes)


def _absolute_part_paths(part: dict[str, Any]) -> dict[str, Any]:
    return {
        k: absolute_path(v, if_exists=True) if k in PART_PATH_KEYS and isinstance(v, str) else v
        for k, v in part.items()
    }


def check_range(value: Any, rng: Range, where: str) -> None:
    """Raises ConfigError naming ``where``, the range and the value when a number of ``value`` is outside ``rng``."""
    if value is None:
        return
    if isinstance(value, dict):
        for k, v in value.items():
            check_range(v, rng, f"{where}.{k}")
    elif not rng.contains(value):
        raise ConfigError(f"{where}: must be {rng}, got {value!r}")


def check_values(obj: Any, where: str) -> None:
    """Checks every ``ranged`` field and every ``Literal`` choice of dataclass instance ``obj`` (for options built
    in Python as well as from YAML); messages name ``where.field``.

    Raises:
        ConfigError: for the first value out of its range or not among its choices.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if "range" in f.metadata:
            check_range(value, f.metadata["range"], f"{where}.{f.name}")
        if typing.get_origin(hints[f.name]) is typing.Literal and value not in typing.get_args(hints[f.name]):
            choices = " | ".join(repr(a) for a in typing.get_args(hints[f.name]))
            raise ConfigError(f"{where}.{f.name}: expected one of {choices}, got {value!r}")
