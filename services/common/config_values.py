"""How a config field's value is read: its annotation reduced to a Kind, text
(a flag, a variable) and config-file values parsed to it, and the files themselves."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_NONE = frozenset({"", "none", "null"})


@dataclasses.dataclass(frozen=True)
class Kind:
    """What a field's annotation allows, reduced to what parsing needs."""

    scalar: type  # int, float, str or bool
    optional: bool = False
    is_list: bool = False
    choices: tuple[Any, ...] | None = None


def kind_of(annotation: Any) -> Kind:
    optional = is_list = False
    if typing.get_origin(annotation) in (Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(rest) != 1 or len(typing.get_args(annotation)) != 2:
            raise TypeError(f"unsupported config type {annotation!r}: only Optional[X] unions")
        annotation, optional = rest[0], True
    if typing.get_origin(annotation) is list:
        (annotation,) = typing.get_args(annotation)
        is_list = True
    choices = None
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        annotation = type(choices[0])
    if annotation not in (int, float, str, bool):
        raise TypeError(f"unsupported config type {annotation!r}")
    return Kind(annotation, optional, is_list, choices)


def _parse_scalar(text: str, kind: Kind) -> Any:
    if kind.scalar is bool:
        lowered = text.strip().lower()
        if lowered not in _TRUE | _FALSE:
            raise ValueError(f"expected a boolean (true/false, 1/0, yes/no, on/off), got {text!r}")
        value: Any = lowered in _TRUE
    else:
        try:
            value = kind.scalar(text.strip() if kind.scalar is not str else text)
        except ValueError:
            raise ValueError(f"expected {kind.scalar.__name__}, got {text!r}") from None
    if kind.choices is not None and value not in kind.choices:
        raise ValueError(f"expected one of {list(kind.choices)}, got {value!r}")
    return value


def parse_text(text: str, kind: Kind) -> Any:
    """A flag or environment string to the field's type."""
    if kind.optional and text.strip().lower() in _NONE:
        return None
    if kind.is_list:
        return [_parse_scalar(item.strip(), kind) for item in text.split(",") if item.strip()]
    return _parse_scalar(text, kind)


def coerce(value: Any, kind: Kind) -> Any:
    """A config-file value (already typed by TOML/JSON) to the field's type."""
    if isinstance(value, str):
        return parse_text(value, kind)
    if value is None:
        if kind.optional:
            return None
        raise ValueError("null is not allowed here")
    if kind.is_list:
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {value!r}")
        return [coerce(item, dataclasses.replace(kind, is_list=False, optional=False)) for item in value]
    # bool is an int in Python; a config that says `port = true` is a mistake.
    ok = isinstance(value, kind.scalar) and not (isinstance(value, bool) and kind.scalar is not bool)
    if kind.scalar is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ValueError(f"expected {kind.scalar.__name__}, got {value!r}")
    if kind.choices is not None and value not in kind.choices:
        raise ValueError(f"expected one of {list(kind.choices)}, got {value!r}")
    return value


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The key/value table of a .toml or .json file (keys may be kebab-case)."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            with path.open("rb") as f:
                data: Any = tomllib.load(f)
        elif suffix == ".json":
            data = json.loads(path.read_text())
        else:
            raise ValueError(f"config file {path}: use a .toml or .json file")
    except (OSError, tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"config file {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a table of settings at the top level")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def flag_type(kind: Kind) -> typing.Callable[[str], Any]:
    """argparse's `type=` for a field: its refusal becomes argparse's message as is."""

    def parse(text: str) -> Any:
        try:
            return parse_text(text, kind)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse
