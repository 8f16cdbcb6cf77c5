"""`pdserve up`'s arguments completed and checked before anything is planned: a conflict or a value
out of range is one line naming the flag (exit 2), not a suite that never becomes ready."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping

from pdserve.common.worker_config import WorkerConfig

# What the launcher itself uses (to plan, to time a profile, to size the store's blocks) and the
# workers also read from their own settings when the flag is left out.
_WORKER_SETTINGS = ("model", "dtype", "device", "quantization")


def from_worker_settings(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> None:
    """Fill --model, --dtype, --device and --quantization, where left out, as the workers will read
    them (PDSERVE_* variables, PDSERVE_CONFIG's file): the store's dtype, the planner's model and the
    workers' are then one."""
    try:
        config = WorkerConfig.from_cli_args(argparse.Namespace(), os.environ if environ is None else environ)
    except ValueError:
        return  # a bad setting: refused once planned, naming the child that would read it

    defaults = {f.name: f.default for f in dataclasses.fields(WorkerConfig)}
    for name in _WORKER_SETTINGS:
        if getattr(args, name, None) is None and getattr(config, name) != defaults[name]:
            setattr(args, name, getattr(config, name))


def check(args: argparse.Namespace) -> None:
    """ValueError naming the first flag that is out of range or that its mode would ignore."""
    for flag, given in (("--prefill", args.prefill is not None), ("--elastic", args.elastic)):
        if given and args.mode not in ("auto", "disaggregated"):
            raise ValueError(f"{flag}: for a disaggregated suite, not --mode {args.mode}")
    for flag, least in (("prefill", 0), ("decode", 1)):
        n = getattr(args, flag)
        if n is not None and n < least:
            raise ValueError(f"--{flag}: at least {least}, got {n}")
    for flag in ("port", "base_port"):  # the launcher dials these: "any free port" cannot be dialled
        value = getattr(args, flag)
        if not 1 <= value <= 65535:
            raise ValueError(f"--{flag.replace('_', '-')}: a port in [1, 65535], got {value}")
    if args.grace < 0 or args.ready_timeout <= 0 or args.restart_window <= 0 or args.restart_limit < 0:
        raise ValueError(
            "--grace >= 0, --ready-timeout > 0, --restart-window > 0 and --restart-limit >= 0, got "
            f"{args.grace:g}, {args.ready_timeout:g}, {args.restart_window:g} and {args.restart_limit}"
        )
