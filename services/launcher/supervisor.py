"""Supervision of a suite's processes: readiness, restarts, crash loops, rolling restarts.

One state machine, `tick()`, runs while the suite starts and while it serves.
With no restart policy a service that exits fails the suite, as a test harness
wants; `pdserve up` passes one, and a crashed service is started again.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections import deque
from typing import Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.common import security
from pdserve.common.server import INSTANCE_ID_KEY
from pdserve.launcher.restarts import Phase, RestartPolicy, ServiceState, usable
from pdserve.launcher.topology import WORKER_ROLES, Service
from pdserve.v1 import router_pb2
from pdserve.v1.router_pb2_grpc import RouterStub

_SERVING = health_pb2.HealthCheckResponse.SERVING


class SuiteError(RuntimeError):
    """The suite could not start or lost a service."""


class Processes(Protocol):
    """What the supervisor asks of a suite (launcher.suite.Suite): its processes, by service name."""

    services: list[Service]
    tls: security.TLS | None
    grace_s: float
    ready_timeout: float
    router_target: str

    def spawn(self, service: Service, warm: bool = False) -> None: ...
    def keep_spare(self) -> None: ...
    def drop_spare(self) -> None: ...
    def poll(self, name: str) -> int | None: ...
    def signal(self, name: str, signum: int) -> subprocess.Popen: ...
    def service(self, name: str) -> Service: ...
    def instance_id(self, name: str) -> str: ...
    def say(self, message: str) -> None: ...


class Supervisor:
    """Keeps `suite`'s services running under `policy` (None: any exit is fatal)."""

    def __init__(self, suite: Processes, policy: RestartPolicy | None = None) -> None:
        self.suite = suite
        self.policy = policy
        self.states: dict[str, ServiceState] = {}
        self._channels: dict[str, grpc.Channel] = {}  # open while a service is STARTING
        self._impostors: set[str] = set()  # addresses that answered for a process we did not start
        self._rolling: deque[str] = deque()
        self._drain_deadline = 0.0
        self._roll_since = 0.0
        self._router: grpc.Channel | None = None
        self._on_change = lambda: None

    @property
    def rolling(self) -> list[str]:
        """The workers a rolling restart has still to restart, the current one first."""
        return list(self._rolling)

    def on_change(self, callback) -> None:
        """`callback()` after every change of a service's phase (the state file)."""
        self._on_change = callback

    # -- starting ------------------------------------------------------------------
    def spawn(self, service: Service, restart: bool = False, warm: bool = False) -> None:
        self.suite.spawn(service, warm)
        self.states.setdefault(service.name, ServiceState()).spawned(restart)
        if service.address:
            self._channels[service.name] = security.dial(service.address, self.suite.tls, sync=True)
        self._on_change()

    def start_stage(self, members: list[Service], deadline: float, stop: threading.Event) -> None:
        """Spawn `members` and wait until each is SERVING (a one-shot step: exited 0) or given up."""
        for service in members:
            self.spawn(service)
        while True:
            why = self.tick(starting=True)
            if why:
                raise self._failed(why, members)
            waiting = [s.name for s in members if self.states[s.name].phase not in (Phase.SERVING, Phase.GIVEN_UP)]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise self._failed(
                    f"not ready after {self.suite.ready_timeout:g}s: {', '.join(waiting)}",
                    [s for s in members if s.name in waiting],
                )
            if stop.wait(0.2):
                raise SuiteError("interrupted while starting")

    def _failed(self, what: str, members: list[Service]) -> SuiteError:
        held = [s.address for s in members if s.name in self._impostors]
        return SuiteError(what + (f"; {', '.join(held)} answered, but not from the process we started" if held else ""))

    # -- serving -------------------------------------------------------------------
    def run(self, stop: threading.Event, roll: threading.Event | None = None) -> int:
        """Supervise until `stop` is set (0) or the suite can no longer serve (1)."""
        while not stop.wait(0.2):
            if roll is not None and roll.is_set():
                roll.clear()
                self.roll()
            why = self.tick()
            if why:
                self.suite.say(f"{why}; stopping the suite")
                return 1
            if not self._rolling and all(s.phase is not Phase.STARTING for s in self.states.values()):
                self.suite.keep_spare()
        return 0

    def roll(self) -> None:
        """Restart the workers one at a time, each drained first (prefill, then decode)."""
        if self._rolling:
            self.suite.say("a rolling restart is already under way")
            return
        workers = [s.name for s in self.suite.services if s.role in WORKER_ROLES]
        self._rolling.extend(sorted(workers, key=lambda n: self.suite.service(n).role != "prefill"))
        self._roll_since = time.time()  # a worker started before this is restarted
        self.suite.drop_spare()
        self.suite.say(f"rolling restart of {', '.join(self._rolling)}, one at a time")
        self._on_change()

    def tick(self, starting: bool = False) -> str | None:
        """Advance every service one step; why the suite cannot go on, or None."""
        now = time.monotonic()
        for service in self.suite.services:
            state = self.states.get(service.name)
            if state is None or state.phase in (Phase.GIVEN_UP, Phase.STOPPED):
                continue
            code = self.suite.poll(service.name)
            if service.address is None:  # a one-shot step
                if code is not None:
                    state.phase = Phase.SERVING if code == 0 else Phase.GIVEN_UP
                    if code:
                        return f"{service.name} exited with code {code} (its log is above)"
                continue
            if code is not None and state.phase is Phase.DRAINING:
                self.suite.say(f"{service.name} drained and stopped; starting it again")
                self.spawn(service, restart=True)
            elif code is not None and state.phase in (Phase.STARTING, Phase.SERVING):
                why = self._exited(service, state, code, before_ready=state.phase is Phase.STARTING, now=now)
                if why:
                    return why
            elif state.phase is Phase.BACKOFF and now >= state.restart_at:
                self.spawn(service, restart=True, warm=True)  # a crash: the spare's imports are of this code
            elif state.phase is Phase.STARTING and self._serving(service):
                self._close_channel(service.name)
                state.phase = Phase.SERVING
                again = f" again (restart {state.restarts})" if state.restarts else ""
                self.suite.say(f"{service.name} is serving{again} at {service.address}")
                self._on_change()
        if not starting:
            self._advance_rolling(now)
        return None

    def _exited(self, service: Service, state: ServiceState, code: int, before_ready: bool, now: float) -> str | None:
        self._close_channel(service.name)
        exited = (
            f"{service.name} exited with code {code} before it was ready"
            if before_ready
            else f"{service.name} exited unexpectedly with code {code}"
        )
        if self.policy is None:
            state.phase, state.last_exit = Phase.STOPPED, code
            return exited + (" (its log is above)" if before_ready else "")
        delay = state.exited(code, self.policy, now)
        self._on_change()
        if delay is not None:
            self.suite.say(f"{exited}; starting it again in {delay:g}s (restart {state.restarts + 1})")
            return None
        given_up = {n for n, s in self.states.items() if s.phase is Phase.GIVEN_UP}
        self.suite.say(
            f"giving up on {service.name}: {len(state.exits)} exits within {self.policy.window_s:g}s "
            f"(the last with code {code}; its log is above)"
        )
        why = usable({s.name: s.role for s in self.suite.services if s.address}, given_up)
        if why is None:
            left = [s.name for s in self.suite.services if s.address and s.name not in given_up]
            self.suite.say(f"serving on without it: {', '.join(left)}")
        return why

    def _advance_rolling(self, now: float) -> None:
        if not self._rolling:
            return
        name = self._rolling[0]
        state = self.states[name]
        if state.phase is Phase.SERVING and state.started_at < self._roll_since:
            state.phase, self._drain_deadline = Phase.DRAINING, now + self.suite.grace_s + 5.0
            self.suite.say(f"rolling restart: draining {name}")
            self.suite.signal(name, signal.SIGTERM)
            self._on_change()
        elif state.phase is Phase.DRAINING and now > self._drain_deadline:
            self.suite.say(f"rolling restart: {name} did not stop within {self.suite.grace_s + 5:g}s; killing it")
            self.suite.signal(name, signal.SIGKILL)
        elif state.phase is Phase.SERVING and self._router_sees(name):
            # Only now the next one: the router must route to this one before another drains.
            self._rolling.popleft()
            self.suite.say(f"rolling restart: {name} is back" + ("" if self._rolling else "; done"))
            self._on_change()
        elif state.phase in (Phase.GIVEN_UP, Phase.STOPPED):
            self._rolling.popleft()

    # -- health --------------------------------------------------------------------
    def _serving(self, service: Service) -> bool:
        """Whether the process we started as `service` answers SERVING. An answer with
        another instance id (another suite's service on this port) never counts; it is
        said once."""
        try:
            check = health_pb2_grpc.HealthStub(self._channels[service.name]).Check
            response, call = check.with_call(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
        except grpc.RpcError:  # not listening yet, or no health service yet
            return False
        if dict(call.trailing_metadata() or ()).get(INSTANCE_ID_KEY) == self.suite.instance_id(service.name):
            return response.status == _SERVING
        if service.name not in self._impostors:
            self._impostors.add(service.name)
            self.suite.say(
                f"{service.address} answers, but not from the {service.name} we started "
                "(another suite on this port?); waiting for ours"
            )
        return False

    def _router_sees(self, worker_id: str) -> bool:
        """Whether the router lists the worker `worker_id` (the suite names workers by their ids) as healthy."""
        if self._router is None:
            self._router = security.dial(self.suite.router_target, self.suite.tls, sync=True)
        try:
            listed = RouterStub(self._router).ListWorkers(
                router_pb2.ListWorkersRequest(), timeout=1.0, metadata=self.suite.router_metadata
            )
        except grpc.RpcError:
            return False
        return any(w.healthy and w.info.worker_id == worker_id for w in listed.workers)

    def _close_channel(self, name: str) -> None:
        channel = self._channels.pop(name, None)
        if channel is not None:
            channel.close()

    def close(self) -> None:
        for name in list(self._channels):
            self._close_channel(name)
        if self._router is not None:
            self._router.close()
