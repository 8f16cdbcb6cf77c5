"""One configuration scheme for every service: a frozen dataclass that inherits `ServiceConfig`.

Each field is a flag, a `PDSERVE_*` variable and a config-file key (flag > environment > file > default);
`validate()` refuses a value with `SettingError`, named with its flag, variable and source.
How to declare one, and the types supported: docs/architecture.md ("Settings").
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import typing
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, TypeVar

from pdserve.common.config_values import Kind, coerce, flag_type, kind_of, load_config_file, parse_text

__all__ = ["ArgumentParser", "CONFIG_DEST", "ServiceConfig", "SettingError", "UsageError", "load_config_file", "option"]

C = TypeVar("C", bound="ServiceConfig")

CONFIG_DEST = "config"  # the file flag's dest; no field may use this name


class SettingError(ValueError):
    """A setting's value is refused; `field` names it (the config field's name)."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field} {reason}")
        self.field = field
        self.reason = reason


class UsageError(ValueError):
    """A command line argparse refuses; the message starts with the program's name."""


class ArgumentParser(argparse.ArgumentParser):
    """Raises UsageError instead of printing the usage and exiting: for a caller
    that checks command lines it does not run (the launcher, its children's)."""

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str = "",
    default_factory: Any = dataclasses.MISSING,
    secret: bool = False,
) -> Any:
    """A dataclass field with help text for --help (a plain default works too).
    `secret`: left out of the config's repr, so logging a config leaks no key."""
    return dataclasses.field(
        default=default, default_factory=default_factory, repr=not secret, metadata={"help": help, "secret": secret}
    )


class ServiceConfig:
    """Mixin for a service's frozen config dataclass (docs/architecture.md, "Settings")."""

    env_prefix: ClassVar[str] = "PDSERVE_"

    def __post_init__(self) -> None:
        # Validate however the config was made: from the CLI or in a test.
        self.validate()

    def validate(self) -> None:
        """Raise SettingError (or ValueError) when the settings are inconsistent; override."""

    def sizes(self) -> str:
        """What this service sized from the machine, for its start-up banner ("" if nothing)."""
        return ""

    # -- shared checks ---------------------------------------------------
    def check_port(self, name: str, *, off: bool = False, taken: Sequence[int] = ()) -> None:
        """A port field: in [0, 65535] (0: any free port), -1 too when `off`, and not one of `taken`."""
        port = getattr(self, name)
        if not (-1 if off else 0) <= port < 65536:
            raise SettingError(name, "must be in [0, 65535]" + (", or -1 for none" if off else ""))
        if port > 0 and port in taken:
            raise SettingError(name, "is another of this service's ports")

    def check_listen_ports(self, also_taken: Sequence[int] = ()) -> None:
        """--port, and --metrics-port (-1: none) clear of it and of the service's other ports."""
        self.check_port("port")
        self.check_port("metrics_port", off=True, taken=[self.port, *also_taken])

    def check_size(self, gib: str, blocks: str) -> None:
        """A memory size, in GiB or in blocks (0 for both: sized from free memory)."""
        if getattr(self, gib) < 0:
            raise SettingError(gib, "must be >= 0 (0: sized from free memory)")
        if getattr(self, blocks) < 0:
            raise SettingError(blocks, f"must be >= 0 (0: from {self.flag_name(gib)})")

    def check_positive(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) <= 0:
                raise SettingError(name, "must be > 0")

    # -- introspection ---------------------------------------------------
    @classmethod
    def _settings(cls) -> list[tuple[dataclasses.Field[Any], Kind]]:
        if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
            raise TypeError(f"{cls.__name__} must be a frozen dataclass")
        hints = typing.get_type_hints(cls)
        settings = [(f, kind_of(hints[f.name])) for f in dataclasses.fields(cls) if f.init]
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
            parser.add_argument(
                "--config",
                dest=CONFIG_DEST,
                default=argparse.SUPPRESS,
                metavar="FILE",
                help=f"TOML or JSON settings file (env {cls.env_prefix}CONFIG)",
            )
        except argparse.ArgumentError:
            pass  # several configs share one parser: one --config serves all
        for f, kind in cls._settings():
            default = (
                f.default
                if f.default is not dataclasses.MISSING
                else "required"
                if f.default_factory is dataclasses.MISSING
                else f.default_factory()
            )
            help_text = f"{f.metadata.get('help', '')} (default: {default}; env {cls.env_name(f.name)})"
            kwargs: dict[str, Any] = {
                "dest": f.name,
                "default": argparse.SUPPRESS,
                "help": help_text.strip().replace("%", "%%"),
            }
            if kind.scalar is bool and not kind.is_list:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                scalar = dataclasses.replace(kind, is_list=False, optional=kind.optional and not kind.is_list)
                kwargs["type"] = flag_type(scalar)
                kwargs["metavar"] = f.name.upper()
                if kind.is_list:
                    kwargs["nargs"] = "*"
                if kind.choices is not None:
                    kwargs["choices"] = list(kind.choices)
                    kwargs.pop("metavar")
            parser.add_argument(cls.flag_name(f.name), **kwargs)
        return parser

    @classmethod
    def from_cli_args(cls: type[C], args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> C:
        """Resolve every field: flag > environment > file > default. A refused value
        raises ValueError naming its flag, its variable and where it came from."""
        values, sources = cls._gather(vars(args), os.environ if environ is None else environ)
        try:
            return cls(**values)
        except ValueError as e:
            raise cls._named(e, values, sources) from None

    @classmethod
    def _gather(cls, given: dict[str, Any], environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
        """Each set field's value, and where those not from a flag came from."""
        path = given.get(CONFIG_DEST) or environ.get(cls.env_name(CONFIG_DEST))
        from_file = load_config_file(path) if path else {}
        settings = cls._settings()
        names = [f.name for f, _ in settings]
        unknown = sorted(set(from_file) - set(names))
        if unknown:
            close = [m for u in unknown for m in difflib.get_close_matches(u, names, 1)]
            raise ValueError(
                f"config file {path}: unknown settings {unknown}"
                + (f" (did you mean {', '.join(close)}?)" if close else "")
            )
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        missing = []
        for f, kind in settings:
            env = cls.env_name(f.name)
            if f.name in given:
                values[f.name] = given[f.name]
            elif env in environ:
                sources[f.name] = "from the environment"
                values[f.name] = cls._resolved(lambda: parse_text(environ[env], kind), f.name, sources[f.name])
            elif f.name in from_file:
                sources[f.name] = f"in {path}"
                values[f.name] = cls._resolved(lambda: coerce(from_file[f.name], kind), f.name, sources[f.name])
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                missing.append(cls.setting_name(f.name))
        if missing:
            raise ValueError(f"missing required settings: {', '.join(missing)}")
        return values, sources

    @classmethod
    def _named(cls, e: ValueError, values: dict[str, Any], sources: dict[str, str]) -> ValueError:
        """`e` restated with the flag and variable of its field: a SettingError's,
        or the field a plain message starts with ("tls_cert and tls_key: ...")."""
        fields = {f.name: f for f, _ in cls._settings()}
        if isinstance(e, SettingError) and e.field in fields:
            name = e.field
            value = values[name] if name in values else fields[name].default
            source = sources.get(name, "" if name in values else "the default")
            suffix = f" ({source})" if source else ""
            return ValueError(f"{cls.setting_name(name)}: {e.reason}, got {value!r}{suffix}")
        first = str(e).split(" ", 1)[0].rstrip(":,")
        return ValueError(f"{cls.setting_name(first)}: {e}") if first in fields else e

    @classmethod
    def setting_name(cls, name: str) -> str:
        """How a user sets a field: `--kv-cache-gib / PDSERVE_KV_CACHE_GIB`."""
        return f"{cls.flag_name(name)} / {cls.env_name(name)}"

    @classmethod
    def _resolved(cls, parse: typing.Callable[[], Any], name: str, source: str) -> Any:
        """Run a parse, naming the setting and where the bad value came from on failure."""
        try:
            return parse()
        except ValueError as e:
            raise ValueError(f"{cls.setting_name(name)}: {e} ({source})") from None

    @classmethod
    def from_argv(
        cls: type[C],
        argv: Sequence[str] | None = None,
        environ: Mapping[str, str] | None = None,
        prog: str | None = None,
    ) -> C:
        """Parse a whole command line; a bad setting exits with usage (code 2)."""
        parser = cls.add_cli_args(argparse.ArgumentParser(prog=prog, description=cls.__doc__))
        args = parser.parse_args(argv)
        try:
            return cls.from_cli_args(args, environ)
        except ValueError as e:
            parser.error(str(e))
