"""YAML into typed dataclasses, strictly.

Every key of a config is a field of a dataclass (or a constructor argument of a registered part).
An unknown key fails with its dotted path and the nearest valid key; a wrong type fails with the
path and the expected type; booleans must be booleans (``--set train.compile=False`` is False, and
``=0`` is an error). There is no fallback value for a misspelt key.

Numeric keys declare their range in the schema (``ranged``), checked here with the key, the range and
the value named. Filesystem paths (``path_field``) are made absolute when the config is loaded, so a
resolved config written into a run directory means the same files from any folder.

Parts chosen by name (``encoders.image: {name: timm, model: resnet18}``) are checked against the
registered class's constructor signature, so the constructor's type hints and docstring are the
schema and the documentation of those keys.

Written by hand rather than with draccus / omegaconf: we need registry-aware
sub-schemas and YAML 1.1's "1e-4 is a string" fixed for float fields, and neither fits both.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from mmpost.config.fields import ConfigError, check_range
from mmpost.registry import Registry, RegistryError

MISSING = dataclasses.MISSING


def registry_field(registry: str, many: bool = False, default: Any = MISSING, default_factory: Any = MISSING) -> Any:
    """A dataclass field whose value names a registered part: ``{name: ..., **kwargs}`` or just the name.

    Args:
        registry: "encoders", "connectors" or "stages".
        many: the value is a ``{modality: part}`` mapping rather than one part.
    """
    return dataclasses.field(
        default=default, default_factory=default_factory, metadata={"registry": registry, "many": many}
    )


def get_registry(name: str) -> Registry:
    if name == "encoders":
        from mmpost.encoders import ENCODERS

        return ENCODERS
    if name == "connectors":
        from mmpost.connectors import CONNECTORS

        return CONNECTORS
    if name == "stages":
        from mmpost.registry import STAGES

        return STAGES
    raise KeyError(name)


def yaml_key(field_name: str) -> str:
    """``from_`` is written ``from`` in YAML (a Python keyword cannot be a field name)."""
    return field_name[:-1] if field_name.endswith("_") else field_name


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _nearest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Checks ``value`` against type hint ``tp`` and returns it (dataclasses built, floats widened)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: must not be null (expected {_type_name(tp)})")
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        if len(errors) == 1:
            raise ConfigError(errors[0])
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: expected one of {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        _, val_tp = typing.get_args(tp) or (str, Any)
        return {str(k): coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML 1.1 reads 2e-5 (no dot) as a string; accept exactly the strings float() reads.
        if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {_type_name(tp)}")


def check_part(registry_name: str, spec: Any, where: str) -> Any:
    """Validates ``spec`` ({name: ..., **kwargs} or a bare name) against the registered part.

    A part with an ``Options`` dataclass (a stage) gets an instance of it; any other part (an encoder, a
    connector) gets ``{name, **kwargs}`` checked against its constructor's signature.
    """
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(f"{where}: expected a mapping with a 'name' key (or just the name), got {spec!r}")
    registry = get_registry(registry_name)
    try:
        cls = registry.get(spec["name"])
    except RegistryError as err:
        raise ConfigError(f"{where}.name: {err}") from None
    options = getattr(cls, "Options", None)
    if dataclasses.is_dataclass(options):
        return from_dict(options, spec, where)
    params, hints = constructor_params(cls)
    out: dict[str, Any] = {"name": spec["name"]}
    for key, value in spec.items():
        if key == "name":
            continue
        if key not in params:
            raise ConfigError(f"{where}.{key}: unknown key for {registry.kind} {spec['name']!r}{_nearest(key, params)}")
        out[key] = coerce(value, hints.get(key, Any), f"{where}.{key}")
    missing = [p for p, param in params.items() if param.default is inspect.Parameter.empty and p not in out]
    if missing:
        raise ConfigError(f"{where}: {registry.kind} {spec['name']!r} needs {', '.join(missing)}")
    return out


def constructor_params(cls: type) -> tuple[dict[str, inspect.Parameter], dict[str, Any]]:
    sig = inspect.signature(cls.__init__)
    params = {
        n: p for n, p in sig.parameters.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    return params, typing.get_type_hints(cls.__init__)


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Builds dataclass ``cls`` from ``data``, checking every key and type; ``where`` prefixes messages."""
    hints = typing.get_type_hints(cls)
    fields = {yaml_key(f.name): f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"{path}: unknown key{_nearest(str(key), list(fields))}")
        field = fields[key]
        registry = field.metadata.get("registry")
        tp = hints[field.name]
        if registry is None:
            kwargs[field.name] = coerce(value, tp, path)
            if "range" in field.metadata:
                check_range(kwargs[field.name], field.metadata["range"], path)
        elif field.metadata["many"]:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a mapping of modality to part, got {value!r}")
            kwargs[field.name] = {k: check_part(registry, v, f"{path}.{k}") for k, v in value.items()}
        else:
            kwargs[field.name] = None if value is None else check_part(registry, value, path)
    for key, field in fields.items():
        if field.name not in kwargs and field.default is MISSING and field.default_factory is MISSING:
            raise ConfigError(f"{where + '.' if where else ''}{key}: required key is missing")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:  # a rule across keys, checked by the dataclass itself
        raise ConfigError(f"{where + ': ' if where else ''}{err}") from None


def to_dict(obj: Any) -> Any:
    """A dataclass config as plain YAML-able data, with YAML key names."""
    if dataclasses.is_dataclass(obj):
        return {yaml_key(f.name): to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies dotlist overrides (``train.lr=2e-5``); values are parsed as YAML (``false``, ``[a, b]``)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.lr=2e-5")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} holds {child!r}, not a mapping")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {_yaml_problem(err)}") from None
    return data


def _yaml_problem(err: yaml.YAMLError) -> str:
    """``line L, column C: problem`` of a YAML error, without PyYAML's ``in "<unicode string>"`` lines."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    if mark is None or problem is None:
        return str(err)
    text = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and context_mark is not None:
        text += f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
    return text


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Reads a YAML file whose top level is a mapping.

    Raises:
        FileNotFoundError: if ``path`` is not a file.
        ConfigError: naming the file, line and column of a YAML syntax error, or a top level that is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: {_yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def parse_docstring(obj: Any) -> dict[str, str]:
    """Field docs from a Google-style ``Attributes:`` or ``Args:`` section."""
    doc = inspect.getdoc(obj) or ""
    docs: dict[str, str] = {}
    in_section, current = False, None
    for line in doc.splitlines():
        if line.strip() in ("Attributes:", "Args:"):
            in_section = True
            continue
        if in_section and line and not line.startswith(" "):
            in_section = False
        if not in_section:
            continue
        match = re.match(r"^    (\w+)(?: \(.*?\))?: (.*)$", line)
        if match:
            current = match.group(1)
            docs[current] = match.group(2).strip()
        elif current and line.strip():
            docs[current] += " " + line.strip()
    return docs


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per key of dataclass ``cls``: dotted key, type, default and its documentation."""
    lines = []
    docs = parse_docstring(cls)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        key = prefix + yaml_key(field.name)
        tp = hints[field.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{key}:  {docs.get(field.name, '')}")
            lines += describe(tp, key + ".")
            continue
        if field.default is not MISSING:
            default = f" = {field.default!r}"
        elif field.default_factory is not MISSING:
            default = f" = {field.default_factory()!r}"
        else:
            default = " (required)"
        registry = field.metadata.get("registry")
        kind = f"one of the registered {registry} (see below)" if registry else _ranged_type_name(tp, field)
        lines.append(f"{key} [{kind}]{default}\n    {docs.get(field.name, 'undocumented')}")
        # An optional section (``data.eval``) has keys of its own, with ranges to show, once it is set.
        lines += [line for a in typing.get_args(tp) if dataclasses.is_dataclass(a) for line in describe(a, key + ".")]
    return lines


def _ranged_type_name(tp: Any, field: dataclasses.Field) -> str:
    """``int >= 1``, ``int >= 1 | null``, ``dict[str, float], values > 0``; the plain type name without a range."""
    rng = field.metadata.get("range")
    if rng is None:
        return _type_name(tp)
    origin = typing.get_origin(tp)
    if origin is dict or tp is dict:
        return f"{_type_name(tp)}, values {rng}"
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " | ".join(f"{_type_name(a)} {rng}" for a in args) + " | null"
    return f"{_type_name(tp)} {rng}"


def describe_registry(registry_name: str) -> list[str]:
    registry = get_registry(registry_name)
    lines = []
    for name in registry.names():
        cls = registry.get(name)
        summary = (inspect.getdoc(cls) or "").splitlines()[0] if inspect.getdoc(cls) else ""
        lines.append(f"{registry.kind} {name!r}: {summary}")
        options = getattr(cls, "Options", None)
        if dataclasses.is_dataclass(options):
            keys = [line for line in describe(options) if not line.startswith("name ")]  # the name is the stage's
            lines += ["    " + line.replace("\n", "\n    ") for line in keys]
            continue
        params, hints = constructor_params(cls)
        docs: dict[str, str] = {}
        for klass in reversed(cls.__mro__):  # a subclass may document only what it changes
            docs |= parse_docstring(klass) | parse_docstring(klass.__init__)
        for pname, param in params.items():
            default = " (required)" if param.default is inspect.Parameter.empty else f" = {param.default!r}"
            lines.append(f"    {pname} [{_type_name(hints.get(pname, Any))}]{default}: {docs.get(pname, '')}")
    return lines
