"""The `pdserve` command line."""

from __future__ import annotations

import argparse
import os
import sys

from pdserve.cli_parser import Parser
from pdserve.common.config import ServiceConfig, SettingError


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set of this much mass")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: none, not reproducible)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _sampling(args):
    from pdserve.common.engine.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
    )


def cmd_generate(args) -> int:
    if args.local:
        return _generate_in_process(args)
    if args.model is not None:  # the router serves its own: the prompt would silently go to another model
        raise SettingError("model", "is for --local (a running suite serves the model it started with)")
    from pdserve.client import Client

    prompt = {"prompt": args.prompt} if args.raw else {"messages": [{"role": "user", "content": args.prompt}]}
    with Client(args.target, api_key=args.api_key, tls=_client_tls(args)) as client:
        _print_stream(client.generate(**prompt, **_sampling_kwargs(args)))
    return 0


def _add_client_security_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-key", default=None, help="the router's API key (default: env PDSERVE_API_KEY)")
    p.add_argument("--tls", action="store_true", help="TLS verified by the system's roots")
    p.add_argument("--tls-ca", default="", help="PEM CA bundle of the router's certificate (implies --tls)")
    p.add_argument("--tls-cert", default="", help="PEM client certificate, for a router that requires one")
    p.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    p.add_argument("--tls-server-name", default="", help="name to verify in the router's certificate")


def _client_tls(args):
    """TLS from the flags, else from PDSERVE_TLS_* (as the services read them), else none."""
    from pdserve.common import security

    if bool(args.tls_cert) != bool(args.tls_key):
        missing, given = ("tls_cert", "--tls-key") if args.tls_key else ("tls_key", "--tls-cert")
        raise SettingError(missing, f"is needed with {given}")
    if args.tls or args.tls_ca or args.tls_cert or args.tls_server_name:
        return security.TLS(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, server_name=args.tls_server_name)
    return security.from_environment(os.environ).client_tls()


def _print_stream(chunks) -> None:
    for chunk in chunks:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _sampling_kwargs(args) -> dict:
    _sampling(args)  # validate locally first, with the same field names as the server
    return dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
    )


def _generate_in_process(args) -> int:
    from pdserve.common.engine.config import EngineConfig
    from pdserve.common.engine.engine import LLMEngine

    params = _sampling(args)  # validate before loading the model
    engine = LLMEngine(EngineConfig(model=args.model, kv_cache_gib=args.kv_cache_gib))
    chat = [{"role": "user", "content": args.prompt}]
    enc = None if args.raw else engine.tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)
    prompt = args.prompt if enc is None else list(enc["input_ids"])
    _print_stream(engine.stream(prompt, params))
    return 0


def cmd_demo(args) -> int:
    """Start the whole suite, stream one completion through the router, stop."""
    from pdserve.client import Client
    from pdserve.common import security
    from pdserve.launcher import Suite

    kwargs = _sampling_kwargs(args)
    with Suite(
        mode=args.mode,
        model=args.model,
        port=args.port,
        base_port=args.base_port,
        kv_cache_gib=args.kv_cache_gib,
        out=sys.stderr,
    ) as suite:
        print(f"suite ready ({args.mode}); router at {suite.router_target}", file=sys.stderr, flush=True)
        tls = security.from_environment(os.environ).client_tls()
        with Client(suite.router_target, tls=tls, api_key=suite.api_key or None) as client:
            _print_stream(client.generate(messages=[{"role": "user", "content": args.prompt}], **kwargs))
    return 0


def cmd_serve(args) -> int:
    import asyncio
    import importlib

    from pdserve import settings
    from pdserve.common import logs, tracing
    from pdserve.common.launcher_bond import follow_launcher
    from pdserve.common.ports import first_taken

    follow_launcher()  # started by `pdserve up`: end with it, however it ends

    try:  # settings first: a bad one is a line and exit 2, before any model loads
        config = settings.resolve(args.service, args)
        settings.check_data_host(config)
        logs.setup(args.log_level, config.log_format, service=args.service)  # the service's own log_format
        tracing.setup(args.service)  # from the standard OTEL_* variables
    except ValueError as e:
        print(f"pdserve serve {args.service}: {e}", file=sys.stderr)
        return 2
    if taken := first_taken(settings.listens(config)):
        print(
            f"pdserve serve {args.service}: {taken.flag} {taken.port}: another process listens on "
            f"{taken.host}:{taken.port}",
            file=sys.stderr,
        )
        return 2
    if sizes := config.sizes():
        print(f"{args.service}: {sizes}", flush=True)  # what it chose from this machine's memory
    serve = importlib.import_module(f"pdserve.{args.service}.serve").serve
    asyncio.run(serve(config))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from pdserve import settings

    parser = Parser(prog="pdserve", description=__doc__)
    settings.add_log_level_arg(parser)
    sub = parser.add_subparsers(dest="command", required=True)  # subcommands' parsers are Parsers too

    gen = sub.add_parser("generate", help="stream a completion from a running router (or --local)")
    gen.add_argument("prompt", help="the user message (with --raw: the whole prompt)")
    gen.add_argument("--target", default="localhost:50051", help="the router's gRPC address")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    gen.add_argument("--local", action="store_true", help="run the engine in this process instead")
    gen.add_argument(
        "--model",
        default=None,
        help="with --local: HF directory, .gguf file or hub id (org/name) (default: bundled SmolLM2)",
    )
    gen.add_argument("--kv-cache-gib", type=float, default=0.5, help="with --local: KV pool size")
    _add_client_security_args(gen)
    _add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    from pdserve import launcher

    launcher.add_commands(sub)  # up, status, restart
    from pdserve.planner.commands import add_commands as add_planner_commands

    add_planner_commands(sub)  # profile, plan

    demo = sub.add_parser(
        "demo",
        help="start the suite, stream one completion through it, stop",
        description="Start the whole suite (router, workers, KV store) as `pdserve up` "
        "does, stream one chat completion of PROMPT through the router to "
        "stdout, then stop the suite. The suite's log goes to stderr. The first "
        "run converts the bundled model (about 25 s).",
    )
    demo.add_argument("prompt", nargs="?", default="What is the capital of France?", help="the user message")
    demo.add_argument(
        "--mode",
        choices=["disaggregated", "colocated"],
        default="disaggregated",
        help="separate prefill and decode workers, or one worker that does both",
    )
    demo.add_argument(
        "--model", default=None, help="HF directory, .gguf file or hub id (org/name) (default: bundled SmolLM2)"
    )
    demo.add_argument("--port", type=int, default=50051, help="the router's gRPC port")
    demo.add_argument("--base-port", type=int, default=50061, help="workers, then the KV store, take ports from here")
    demo.add_argument(
        "--kv-cache-gib",
        type=float,
        default=None,
        help="KV cache per worker (default: sized from free memory, as by pdserve up)",
    )
    _add_sampling_args(demo)
    demo.set_defaults(func=cmd_demo)

    serve = sub.add_parser("serve", help="run one service (router, prefill, decode, elastic or kvstore)")
    settings.add_serve_parsers(serve)
    serve.set_defaults(func=cmd_serve)

    from pdserve.bench.commands import add_commands as add_bench_commands

    add_bench_commands(sub)  # bench engine, ttft, load, compare, ...
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # here, where a reader that is gone (`pdserve status | head`) can be handled
    except KeyboardInterrupt:  # Ctrl-C before a command's own handling (a model loading, a plan timed)
        return 130  # 128 + SIGINT, and no traceback
    except BrokenPipeError:
        # Stop quietly, as a shell tool does when its reader stops; stdout goes nowhere from here,
        # so that Python's own flush at exit has nothing left to complain about.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE


def _main(argv: list[str] | None) -> int:
    from pdserve import settings

    args = build_parser().parse_args(argv)
    try:
        args.log_level = settings.log_level(args.log_level)
    except ValueError as e:  # one line, as every bad setting
        print(f"pdserve: {e}", file=sys.stderr)
        return 2
    from pdserve.common import logs

    log_format = os.environ.get("PDSERVE_LOG_FORMAT", "text")  # `serve` reads its config's log_format again
    logs.setup(args.log_level, log_format if log_format in logs.FORMATS else "text")
    from pdserve.client.errors import PdserveClientError
    from pdserve.common.errors import InvalidRequestError, MissingModelError

    try:
        return args.func(args)
    except InvalidRequestError as e:
        print(f"pdserve: invalid request: {e}", file=sys.stderr)
        return 2
    except MissingModelError as e:  # a mistyped --model, or the default's package not installed
        print(f"pdserve {args.command}: {e}", file=sys.stderr)
        return 2
    except SettingError as e:  # e.g. generate --local --kv-cache-gib -1
        print(f"pdserve {args.command}: {ServiceConfig.flag_name(e.field)} {e.reason}", file=sys.stderr)
        return 2
    except PdserveClientError as e:  # the router's answer (or no answer): its status, not a traceback
        print(f"pdserve: {e}", file=sys.stderr)
        return 2 if e.field else 1


if __name__ == "__main__":
    sys.exit(main())
