"""The `pdserve` command line's parser: every default in --help, a bad flag in one line."""

from __future__ import annotations

import argparse
import typing


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless its help states it already or it has none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or action.default is None
            or action.default is False
            or action.default in ("", [], argparse.SUPPRESS)
        ):
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Every default in --help, and a bad flag in one line (exit 2), without the usage."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")
