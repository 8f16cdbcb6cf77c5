"""Each service's settings, resolved from its command line, environment and file.

`pdserve serve NAME` runs on them. `pdserve up` resolves every child's command
line the same way before it starts any, so that a bad setting is one line and
exit 2 from the launcher, not a failure in each child.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence

from pdserve.common.config import ArgumentParser, ServiceConfig, SettingError
from pdserve.common.engine.config import check_device
from pdserve.common.ports import Listen
from pdserve.common.worker_config import WorkerConfig
from pdserve.kvstore.config import KVStoreConfig
from pdserve.router.config import RouterConfig

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
SERVICES: dict[str, tuple[type[ServiceConfig], str]] = {
    "router": (RouterConfig, "client-facing router"),
    "prefill": (WorkerConfig, "prefill worker"),
    "decode": (WorkerConfig, "decode worker (--role colocated: both phases)"),
    "elastic": (WorkerConfig, "worker whose role (--role prefill, decode or both) a router switches at runtime"),
    "kvstore": (KVStoreConfig, "shared KV block store"),
}


def add_log_level_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level", default=None, help=f"{', '.join(LOG_LEVELS)} (default: WARNING; env PDSERVE_LOG_LEVEL)"
    )


def log_level(given: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """--log-level, else PDSERVE_LOG_LEVEL, else WARNING; ValueError naming both if unknown."""
    level = given or environ.get("PDSERVE_LOG_LEVEL") or "WARNING"
    if level.upper() not in LOG_LEVELS:
        raise ValueError(f"--log-level / PDSERVE_LOG_LEVEL: expected one of {', '.join(LOG_LEVELS)}, got {level!r}")
    return level.upper()


def add_serve_parsers(serve: argparse.ArgumentParser) -> None:
    """`serve router|prefill|decode|kvstore`, one flag per config field."""
    sub = serve.add_subparsers(dest="service", required=True)
    for name, (config, help_text) in SERVICES.items():
        config.add_cli_args(sub.add_parser(name, help=help_text))


def resolve(service: str, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServiceConfig:
    """The service's config from its parsed flags, the environment and its file, for
    this machine (a worker's device must exist); ValueError naming a refused setting."""
    config = SERVICES[service][0].from_cli_args(args, environ)
    if not isinstance(config, WorkerConfig):
        return config
    if service == "decode" and config.role in ("prefill", "both"):
        raise ValueError(
            f"--role / PDSERVE_ROLE: a decode worker's role is decode or colocated, "
            f"got {config.role!r} (for prefill: pdserve serve prefill; both: pdserve serve elastic)"
        )
    if service == "elastic" and config.role == "colocated":
        raise ValueError("--role / PDSERVE_ROLE: an elastic worker's role is prefill, decode or both, got 'colocated'")
    try:
        check_device(config.device)
    except SettingError as e:
        raise ValueError(f"{config.setting_name('device')}: {e.reason}, got {config.device!r}") from None
    return dataclasses.replace(config, role="prefill") if service == "prefill" else config


def check_commands(commands: Mapping[str, Sequence[str]], environ: Mapping[str, str] | None = None) -> None:
    """Resolve each named `pdserve [--log-level L] serve NAME ...` command line (the
    words after `python -m pdserve`) as its process will; ValueError on the first refusal."""
    environ = os.environ if environ is None else environ
    check_tracing(environ)
    parser = ArgumentParser(prog="pdserve")
    add_log_level_arg(parser)
    add_serve_parsers(parser.add_subparsers(dest="command", required=True).add_parser("serve"))
    for name, argv in commands.items():
        try:
            args = parser.parse_args(list(argv))
            log_level(args.log_level, environ)
            resolve(args.service, args, environ)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None


def check_tracing(environ: Mapping[str, str]) -> None:
    """The OTEL_* variables every service reads at start (pdserve.common.tracing.setup)."""
    from pdserve.common import tracing

    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() != "true" and tracing.exporters_from_env(environ):
        tracing.sampler_from_env(environ)


def check_data_host(config: ServiceConfig) -> None:
    """A UCX data plane's host must be an address of this machine (ValueError naming it). Checked
    here, not in `pdserve up`'s launcher, which may start children in other network namespaces."""
    if getattr(config, "transport", None) == "ucx":
        from pdserve.common.transfer.netdev import data_host, ucx_options

        ucx_options(data_host(config))


def listens(config: ServiceConfig) -> list[Listen]:
    """The TCP ports a service's config binds, each with the flag that moves it."""
    ports = [Listen(config.host, config.port, "--port"), Listen(config.host, config.metrics_port, "--metrics-port")]
    if hasattr(config, "http_port"):  # the router's OpenAI API
        ports.append(Listen(config.http_host or config.host, config.http_port, "--http-port"))
    return ports
