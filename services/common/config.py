"""One configuration scheme for every service.

Each service's configuration is one frozen dataclass that inherits
`ServiceConfig`. From its fields alone it gets:

- a kebab-case command-line flag per field (`max_batch_tokens` ->
  `--max-batch-tokens`; bools get `--x` / `--no-x`, lists take several values),
- an environment fallback per field (`PDSERVE_MAX_BATCH_TOKENS`; lists are
  comma-separated; for Optional fields "" or "none" means None),
- an optional config file (`--config` / `PDSERVE_CONFIG`, TOML or JSON with
  the field names as keys; JSON and TOML need no extra dependency),

with precedence flag > environment > file > default, and validation through
a `validate()` hook that raises ValueError. Supported field types: int,
float, str, bool, Literal[...] of those, Optional[...] and list[...] of them.

    @dataclass(frozen=True)
    class DecodeConfig(ServiceConfig):
        port: int = option(50052, help="gRPC port")
        def validate(self) -> None:
            if self.port < 0: raise ValueError("port must be >= 0")

    config = DecodeConfig.from_argv()   # or add_cli_args(parser) + from_cli_args(args)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union

C = TypeVar("C", bound="ServiceConfig")

CONFIG_DEST = "config"  # the file flag's dest; no field may use this name
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_NONE = frozenset({"", "none", "null"})


def option(default: Any = dataclasses.MISSING, *, help: str = "",
           default_factory: Any = dataclasses.MISSING, secret: bool = False) -> Any:
    """A dataclass field with help text for --help (a plain default works too).
    `secret`: left out of the config's repr, so logging a config leaks no key."""
    return dataclasses.field(default=default, default_factory=default_factory, repr=not secret,
                             metadata={"help": help, "secret": secret})


@dataclasses.dataclass(frozen=True)
class _Kind:
    """What a field's annotation allows, reduced to what parsing needs."""

    scalar: type  # int, float, str or bool
    optional: bool = False
    is_list: bool = False
    choices: tuple[Any, ...] | None = None


def _kind_of(annotation: Any) -> _Kind:
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
    return _Kind(annotation, optional, is_list, choices)


def _parse_scalar(text: str, kind: _Kind) -> Any:
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


def _parse_text(text: str, kind: _Kind) -> Any:
    """A flag or environment string to the field's type."""
    if kind.optional and text.strip().lower() in _NONE:
        return None
    if kind.is_list:
        return [_parse_scalar(item.strip(), kind) for item in text.split(",") if item.strip()]
    return _parse_scalar(text, kind)


def _coerce(value: Any, kind: _Kind) -> Any:
    """A config-file value (already typed by TOML/JSON) to the field's type."""
    if isinstance(value, str):
        return _parse_text(value, kind)
    if value is None:
        if kind.optional:
            return None
        raise ValueError("null is not allowed here")
    if kind.is_list:
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {value!r}")
        return [_coerce(item, dataclasses.replace(kind, is_list=False, optional=False))
                for item in value]
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


class ServiceConfig:
    """Mixin for a service's frozen config dataclass; see the module docstring."""

    env_prefix: ClassVar[str] = "PDSERVE_"

    def __post_init__(self) -> None:
        # Validate however the config was made: from the CLI or in a test.
        self.validate()

    def validate(self) -> None:
        """Raise ValueError when the settings are inconsistent; override."""

    # -- introspection ---------------------------------------------------
    @classmethod
    def _settings(cls) -> list[tuple[dataclasses.Field[Any], _Kind]]:
        if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
            raise TypeError(f"{cls.__name__} must be a frozen dataclass")
        hints = typing.get_type_hints(cls)
        settings = [(f, _kind_of(hints[f.name])) for f in dataclasses.fields(cls) if f.init]
        if any(f.name == CONFIG_DEST for f, _ in settings):
            raise TypeError(f"{cls.__name__}: field name {CONFIG_DEST!r} is reserved for the file flag")
        return settings

    @classmethod
    def flag_name(cls, name: str) -> str:
        return "--" + name.replace("_", "-")

    @classmethod
    def env_name(cls, name: str) -> str:
        return cls.env_prefix + name.upper()

    # -- command line ----------------------------------------------------
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Add one flag per field, plus --config; defaults stay unset here so
        that from_cli_args can tell an explicit flag from a fallback."""
        try:
            parser.add_argument("--config", dest=CONFIG_DEST, default=argparse.SUPPRESS,
                                metavar="FILE", help=f"TOML or JSON settings file "
                                f"(env {cls.env_prefix}CONFIG)")
        except argparse.ArgumentError:
            pass  # several configs share one parser: one --config serves all
        for f, kind in cls._settings():
            default = (f.default if f.default is not dataclasses.MISSING
                       else "required" if f.default_factory is dataclasses.MISSING
                       else f.default_factory())
            help_text = f"{f.metadata.get('help', '')} (default: {default}; env {cls.env_name(f.name)})"
            kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                                      "help": help_text.strip().replace("%", "%%")}
            if kind.scalar is bool and not kind.is_list:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                scalar = dataclasses.replace(kind, is_list=False,
                                             optional=kind.optional and not kind.is_list)
                kwargs["type"] = lambda text, k=scalar: _parse_text(text, k)
                kwargs["metavar"] = f.name.upper()
                if kind.is_list:
                    kwargs["nargs"] = "*"
                if kind.choices is not None:
                    kwargs["choices"] = list(kind.choices)
                    kwargs.pop("metavar")
            parser.add_argument(cls.flag_name(f.name), **kwargs)
        return parser

    @classmethod
    def from_cli_args(cls: type[C], args: argparse.Namespace,
                      environ: Mapping[str, str] | None = None) -> C:
        """Resolve every field: flag > environment > file > default."""
        environ = os.environ if environ is None else environ
        given = vars(args)
        path = given.get(CONFIG_DEST) or environ.get(cls.env_name(CONFIG_DEST))
        from_file = load_config_file(path) if path else {}
        settings = cls._settings()
        unknown = sorted(set(from_file) - {f.name for f, _ in settings})
        if unknown:
            raise ValueError(f"config file {path}: unknown settings {unknown}")
        values: dict[str, Any] = {}
        missing = []
        for f, kind in settings:
            env = cls.env_name(f.name)
            if f.name in given:
                values[f.name] = given[f.name]
            elif env in environ:
                values[f.name] = _resolved(lambda: _parse_text(environ[env], kind), env)
            elif f.name in from_file:
                values[f.name] = _resolved(lambda: _coerce(from_file[f.name], kind),
                                           f"{f.name} in {path}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                missing.append(f"{cls.flag_name(f.name)} / {env}")
        if missing:
            raise ValueError(f"missing required settings: {', '.join(missing)}")
        return cls(**values)

    @classmethod
    def from_argv(cls: type[C], argv: Sequence[str] | None = None,
                  environ: Mapping[str, str] | None = None, prog: str | None = None) -> C:
        """Parse a whole command line; a bad setting exits with usage (code 2)."""
        parser = cls.add_cli_args(argparse.ArgumentParser(prog=prog, description=cls.__doc__))
        args = parser.parse_args(argv)
        try:
            return cls.from_cli_args(args, environ)
        except ValueError as e:
            parser.error(str(e))


def _resolved(parse: typing.Callable[[], Any], source: str) -> Any:
    """Run a parse, naming where the bad value came from on failure."""
    try:
        return parse()
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
