"""Loading a config: YAML, then dotted ``--set`` overrides, every key and type checked against the
schema as it is read, then the value checks of :mod:`distill.config.checks`; and writing the
resolved config back (credentials redacted).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from distill.config.checks import validate
from distill.config.schema import DistillConfig, to_dict
from distill.errors import ConfigError
from distill.redaction import redact
from distill.rundir import write_atomic

def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> DistillConfig:
    """Loads a YAML config, applies ``key.sub=value`` overrides, checks and returns it."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark else ""
            raise ConfigError(f"malformed YAML in {path}{where}: {getattr(err, 'problem', err)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (teacher:, student:, ...)")
    for item in overrides:
        apply_override(data, item)
    cfg = from_dict(DistillConfig, data, prefix="")
    if cfg.train.epochs is not None and "max_steps" in (data.get("train") or {}):
        raise ConfigError(f"train.epochs={cfg.train.epochs:g} and train.max_steps={cfg.train.max_steps} are both set: keep one "
                          "(epochs counts passes over the training data, max_steps optimizer steps)")
    validate(cfg)
    return cfg


def unknown_key(key: str, known) -> ConfigError:
    """The error for an unknown ``key`` (dotted), with the nearest known spelling when one is close."""
    *section, last = key.split(".")
    close = difflib.get_close_matches(last, list(known), n=1, cutoff=0.6)
    hint = f"; did you mean {'.'.join([*section, close[0]])}?" if close else ""
    return ConfigError(f"unknown config key: {key}{hint}")


def apply_override(data: dict, item: str) -> None:
    """Sets ``data[a][b] = value`` for ``item = "a.b=value"`` (value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects key.sub=value, got {item!r}")
    parts = key.strip().split(".")
    lookup_field(parts)  # fails on unknown keys, naming them
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        node[parts[-1]] = raw


def lookup_field(parts: list[str]) -> dataclasses.Field:
    """The field of the dotted key ``parts`` (["loss", "alpha"]); a ConfigError naming the key when there is none."""
    cls: Any = DistillConfig
    found = None
    for i, part in enumerate(parts):
        if cls is dict:  # free-form mapping (student.architecture): any sub-key
            return found
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            raise unknown_key(".".join(parts[: i + 1]), fields)
        found = fields[part]
        cls = typing.get_type_hints(cls)[part]
        if typing.get_origin(cls) in (typing.Union, types.UnionType):  # Optional[Section]
            cls = next(a for a in typing.get_args(cls) if a is not type(None))
    return found


def from_dict(cls: type, data: Any, prefix: str) -> Any:
    """Builds dataclass ``cls`` from a mapping, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise unknown_key(f"{prefix}{key}", names)
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _convert(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, prefix=key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key)
    if origin is Literal:
        if isinstance(value, bool) and str(value).lower() in args:  # YAML reads a bare false as a bool
            value = str(value).lower()
        if value not in args:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, args))} (got {value!r})")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if hint is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    if hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")  # a bug in this file, not user input


def config_yaml(cfg: DistillConfig) -> str:
    """The resolved config (every option, defaults included) as YAML, with credentials redacted."""
    return yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False)


def save_config(cfg: DistillConfig, path: str | os.PathLike) -> None:
    """Writes :func:`config_yaml` to ``path``."""
    write_atomic(Path(path), config_yaml(cfg))
