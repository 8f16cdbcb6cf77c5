"""Suite: starts a plan's services stage by stage, relays their logs, and stops them."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

from pdserve.common import ports, security
from pdserve.common.auth import bearer
from pdserve.common.launcher_bond import LAUNCHER_PID_ENV
from pdserve.common.server import INSTANCE_ID_ENV
from pdserve.launcher.restarts import RestartPolicy
from pdserve.launcher.spare import Spare
from pdserve.launcher.supervisor import SuiteError, Supervisor
from pdserve.launcher.topology import WORKER_ROLES, Service, http_port_from, plan

__all__ = ["PortInUseError", "Suite", "SuiteError"]
_COLORS = ("36", "33", "35", "32", "34", "91", "96", "93")


class PortInUseError(SuiteError):
    """Another process holds a port the suite would listen on (nothing was started)."""


class Suite:
    """Starts services stage by stage, relays their logs, and stops them.
    Keyword arguments go to `plan()`, or pass `services=` directly. With a
    `restarts` policy a service that exits is started again (`Supervisor`);
    without one, any exit fails the suite."""

    def __init__(
        self,
        mode: str = "disaggregated",
        prefill: int = 1,
        decode: int = 1,
        *,
        services: list[Service] | None = None,
        log_dir: str | Path | None = None,
        ready_timeout: float = 300.0,
        grace_s: float = 15.0,
        out: TextIO | None = None,
        env: dict[str, str] | None = None,
        restarts: RestartPolicy | None = None,
        **plan_kwargs,
    ) -> None:
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}  # children log line by line
        if services is None:
            plan_kwargs.setdefault("http_port", http_port_from(self._env))
        self.services = (
            services if services is not None else plan(mode, prefill, decode, grace_s=grace_s, **plan_kwargs)
        )
        self.log_dir = Path(log_dir) if log_dir else None
        self.ready_timeout = ready_timeout
        self.grace_s = grace_s
        self.out = out or sys.stdout
        color = self.out.isatty() and "NO_COLOR" not in os.environ
        self._prefix = {
            s.name: (f"\x1b[{_COLORS[i % len(_COLORS)]}m[{s.name}]\x1b[0m " if color else f"[{s.name}] ")
            for i, s in enumerate(self.services)
        }
        try:  # the children's own PDSERVE_TLS_* settings: health polls must speak their TLS
            settings = security.from_environment(self._env)
            self.tls = settings.client_tls()
            # The router's API keys, if it has any: our own ListWorkers calls (rolling restarts) need one.
            self.api_key = self._env.get("PDSERVE_API_KEY") or settings.own_api_key()
        except ValueError as e:
            raise SuiteError(f"security settings: {e}") from None
        self.router_metadata = bearer(self.api_key)
        self._procs: dict[str, subprocess.Popen] = {}
        self._instances: dict[str, str] = {}  # name -> the id its health answers must carry
        self._pumps: list[threading.Thread] = []
        self._spare_label = ["spare"]  # the name the spare's lines are relayed under (a worker's once it takes over)
        self._lock = threading.RLock()  # re-entrant: say() also runs in signal handlers
        self.supervisor = Supervisor(self, restarts)
        workers = [s.argv for s in self.services if s.role in WORKER_ROLES and tuple(s.argv[1:3]) == ("-m", "pdserve")]
        # With restarts, a worker process kept imported for a crashed worker to restart in (spare.py).
        self.spare = Spare(workers[0][0], self._env) if workers and restarts and restarts.spare else None

    @property
    def router_target(self) -> str:
        return next(s.address for s in self.services if s.name == "router")

    def service(self, name: str) -> Service:
        return next(s for s in self.services if s.name == name)

    def pid(self, name: str) -> int | None:
        proc = self._procs.get(name)
        return proc.pid if proc else None

    def poll(self, name: str) -> int | None:
        """The exit code of `name`'s current process, None while it runs."""
        return self._procs[name].poll()

    def instance_id(self, name: str) -> str:
        """The id the health answers of `name`'s current process carry."""
        return self._instances[name]

    def say(self, message: str) -> None:
        with self._lock:
            try:
                print(f"pdserve up: {message}", file=self.out, flush=True)
            except (OSError, ValueError):
                pass  # our stdout is gone (a closed pipe, a hung-up terminal): supervising matters more

    def _pump(self, label: list[str], stream) -> None:
        """Relay a process's lines under `label[0]`, its service's name (a spare's changes when it takes over)."""
        log_file, logged = None, None
        try:
            for raw in iter(stream.readline, b""):
                line, name = raw.decode("utf-8", "replace").rstrip("\n"), label[0]
                with self._lock:
                    try:
                        print(self._prefix.get(name, f"[{name}] ") + line, file=self.out, flush=True)
                    except (OSError, ValueError):
                        pass  # our stdout is gone (e.g. piped to head): keep draining, or the child blocks
                if self.log_dir and logged != name:
                    if log_file:
                        log_file.close()
                    log_file, logged = open(self.log_dir / f"{name}.log", "a", encoding="utf-8"), name
                if log_file:
                    log_file.write(line + "\n")
                    log_file.flush()
        finally:
            stream.close()
            if log_file:
                log_file.close()

    def _relay(self, label: list[str], proc: subprocess.Popen) -> None:
        pump = threading.Thread(target=self._pump, args=(label, proc.stdout), daemon=True)
        pump.start()
        self._pumps.append(pump)

    def spawn(self, service: Service, warm: bool = False) -> None:
        """Start `service`'s process; `warm` (a crash's restart): in the spare, if there is one."""
        self._instances[service.name] = secrets.token_hex(8)
        instance = {INSTANCE_ID_ENV: self._instances[service.name]}
        spare = self.spare.claim(service.argv) if warm and self.spare and service.role in WORKER_ROLES else None
        if spare is not None:
            self._spare_label[0] = service.name  # before it is told: every line it prints from here
            if self.spare.hand_over(spare, service.argv, instance):
                self._procs[service.name] = spare
                self.say(f"{service.name}: restarting in the spare process (pid {spare.pid})")
                return
        env = {**self._env, **instance, LAUNCHER_PID_ENV: str(os.getpid())}
        # Own process group: a terminal's Ctrl-C reaches only us, and we stop
        # the children in order instead of all at once.
        proc = subprocess.Popen(
            service.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            process_group=0,
        )
        self._procs[service.name] = proc
        self._relay([service.name], proc)

    def keep_spare(self) -> None:
        """Start a spare if the suite keeps one and has none: called while every service serves,
        so that its imports do not slow a start."""
        if self.spare is not None and self.spare.needed():
            try:
                self._spare_label = ["spare"]
                self._relay(self._spare_label, self.spare.start())
            except OSError as e:  # an optimisation: never a reason to stop serving
                self.say(f"could not start a spare worker process ({e}); restarts start afresh")

    def drop_spare(self) -> None:
        """Stop the spare: a rolling restart may be of new code, which a spare has not imported."""
        if self.spare is not None:
            self.spare.stop()

    def check_ports(self) -> None:
        """Raise PortInUseError naming the first port another process holds, and the flag that moves it."""
        taken = ports.first_taken(listen for s in self.services for listen in s.listens)
        if taken:
            raise PortInUseError(
                f"port {taken.port} ({taken.flag}) is in use on {taken.host}; choose another with {taken.flag}"
            )

    def start(self, stop: threading.Event | None = None) -> None:
        """Start every stage and wait for it; raises SuiteError (after stopping
        what started) when a service dies, times out, or `stop` is set."""
        stop = stop or threading.Event()
        self.check_ports()  # before anything starts: nothing to stop, and no false "ready"
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.ready_timeout
        try:
            for stage in sorted({s.stage for s in self.services}):
                self.supervisor.start_stage([s for s in self.services if s.stage == stage], deadline, stop)
        except BaseException:
            self.stop()
            raise

    def wait(self, stop: threading.Event, roll: threading.Event | None = None) -> int:
        """Supervise until `stop` is set (0) or the suite can no longer serve (1);
        `roll` set asks for a rolling restart of the workers."""
        return self.supervisor.run(stop, roll)

    def stop(self) -> None:
        """SIGTERM running children, last stage first; SIGKILL after the grace period."""
        self.supervisor.close()
        self.drop_spare()
        for stage in sorted({s.stage for s in self.services}, reverse=True):
            procs = {
                s.name: self._procs[s.name]
                for s in self.services
                if s.stage == stage and s.name in self._procs and self._procs[s.name].poll() is None
            }
            for proc in procs.values():
                proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.grace_s
            for name, proc in procs.items():
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self.say(f"{name} did not stop within {self.grace_s:g}s; killing it")
                    proc.kill()
                    proc.wait()
        for pump in self._pumps:
            pump.join(timeout=5)  # the last lines of every log

    def signal(self, name: str, signum: int) -> subprocess.Popen:
        """Send one service a signal (SIGTERM drains it, SIGKILL is a crash); its process."""
        proc = self._procs[name]
        proc.send_signal(signum)
        return proc

    def kill(self) -> None:  # a second Ctrl-C
        spare = self.spare and self.spare.proc
        for proc in [*self._procs.values(), *([spare] if spare else [])]:
            if proc.poll() is None:
                proc.kill()

    def __enter__(self) -> Suite:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
