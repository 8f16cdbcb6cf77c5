"""`pdserve up` beside ports other processes hold: a taken port is refused before
anything starts, and a health answer from a process the launcher did not start
never makes a service ready. Real processes and real gRPC servers; no model."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from pdserve.common import ports
from pdserve.launcher import PortInUseError, Service, Suite, SuiteError
from tests.e2e.conftest import free_port_run
from tests.polling import eventually

# pdserve's own server stack with its health service SERVING on 127.0.0.1:argv[1]
# (0: any port), which it prints: a service of this suite, or of another.
PDSERVE_HEALTH = """
import asyncio, sys
from pdserve.common.server import add_health_service, bind, create_server
async def main():
    server = create_server()
    health = await add_health_service(server)
    port = bind(server, "127.0.0.1", int(sys.argv[1]))
    await server.start()
    await health.set_serving(True)
    print(port, flush=True)
    await server.wait_for_termination()
asyncio.run(main())
"""
# --port, --base-port (prefill-0, decode-0, kvstore), --http-port, --metrics-port (four): offsets in a run
LAYOUT = {"--port": 0, "--base-port": 1, "--http-port": 4, "--metrics-port": 5}
TAKEN = {"--port": 0, "--base-port": 2, "--http-port": 4, "--metrics-port": 7}  # decode-0's; the decode's metrics


@contextmanager
def pdserve_health_server(instance_id: str | None, port: int = 0) -> Iterator[int]:
    """Another suite's service: pdserve's health service, SERVING, with its own instance id."""
    env = {k: v for k, v in os.environ.items() if k != "PDSERVE_INSTANCE_ID"}
    env.update({"PDSERVE_INSTANCE_ID": instance_id} if instance_id else {})
    proc = subprocess.Popen(
        [sys.executable, "-c", PDSERVE_HEALTH, str(port)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        yield int(proc.stdout.readline())  # printed once SERVING
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()


@contextmanager
def plain_health_server() -> Iterator[int]:
    """Any gRPC server with grpc.health.v1 (SERVING by default) and no instance id."""
    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(None)


def up(base: int, *extra: str) -> tuple[int, list[str], float]:
    """`pdserve up` on the ports of LAYOUT from `base`: exit code, output lines, seconds it ran."""
    flags = [str(x) for flag, offset in LAYOUT.items() for x in (flag, base + offset)]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdserve", "up", *flags, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.terminate()  # it started a suite: SIGTERM stops it and its services
        out, _ = proc.communicate(timeout=120)
        pytest.fail(f"pdserve up was still running after 30s:\n{out}")
    return proc.returncode, out.splitlines(), time.monotonic() - t0


@pytest.fixture
def bad_setting_s() -> float:
    """How long this machine takes, just now, to start `pdserve up` and refuse a bad setting
    (no decode worker): the baseline of a refusal, measured beside each one as the load varies."""
    code, _, elapsed = up(free_port_run(9), "--decode", "0")
    assert code == 2
    return elapsed


def refused_at_once(elapsed: float, bad_setting_s: float) -> bool:
    # 2 s as issue 22 asks, or twice the interpreter's own start on a loaded machine: a
    # launcher that started anything waits for readiness and never exits 2 by itself.
    return elapsed < max(2.0, 2 * bad_setting_s)


@pytest.mark.parametrize("flag", list(TAKEN))
def test_up_refuses_a_port_another_process_listens_on_at_once_naming_it_and_its_flag(flag, bad_setting_s):
    base = free_port_run(9)
    taken = base + TAKEN[flag]
    with socket.create_server(("127.0.0.1", taken)):
        code, lines, elapsed = up(base)
    assert code == 2
    assert lines == [f"pdserve up: port {taken} ({flag}) is in use on 127.0.0.1; choose another with {flag}"]
    assert refused_at_once(elapsed, bad_setting_s), f"{elapsed:.2f}s (a bad setting: {bad_setting_s:.2f}s)"


def test_up_refuses_the_port_another_suite_s_router_answers_health_on(bad_setting_s):
    base = free_port_run(9)
    with pdserve_health_server("another-suite", port=base) as taken:
        code, lines, elapsed = up(base)
    assert code == 2
    assert lines == [f"pdserve up: port {taken} (--port) is in use on 127.0.0.1; choose another with --port"]
    assert refused_at_once(elapsed, bad_setting_s), f"{elapsed:.2f}s (a bad setting: {bad_setting_s:.2f}s)"


def test_a_suite_refuses_a_taken_port_before_it_starts_anything():
    base = free_port_run(5)
    with socket.create_server(("127.0.0.1", base + 4)):  # the HTTP port the plan derives: after the store's
        suite = Suite(port=base, base_port=base + 1, out=io.StringIO())
        with pytest.raises(PortInUseError, match=f"port {base + 4} \\(--http-port\\) is in use"):
            suite.start()
    assert suite._procs == {}


@pytest.mark.parametrize("foreign", ["another suite's pdserve service", "a plain gRPC health server"])
def test_readiness_never_counts_an_answer_from_a_process_the_suite_did_not_start(foreign):
    out = io.StringIO()
    server = pdserve_health_server("another-suite") if foreign.endswith("service") else plain_health_server()
    with server as port:
        # Ours never answers (as a worker still loading its model); only the other process does.
        ours = Service("router", (sys.executable, "-c", "import time; time.sleep(60)"), f"127.0.0.1:{port}", 0)
        suite = Suite(services=[ours], out=out, ready_timeout=2, grace_s=5)
        with pytest.raises(
            SuiteError,
            match=f"not ready after 2s: router; 127.0.0.1:{port} answered, but not from the process we started",
        ):
            suite.start()
    assert f"127.0.0.1:{port} answers, but not from the router we started" in out.getvalue()
    assert "is serving" not in out.getvalue()


def test_a_pdserve_service_the_suite_started_is_ready_by_its_instance_id():
    port = free_port_run(1)
    ours = Service("kvstore", (sys.executable, "-c", PDSERVE_HEALTH, str(port)), f"127.0.0.1:{port}", 0)
    out = io.StringIO()
    with Suite(services=[ours], out=out, ready_timeout=30, grace_s=5):
        assert f"kvstore is serving at 127.0.0.1:{port}" in out.getvalue()
    assert "not from the" not in out.getvalue()


def test_a_port_a_stopped_suite_left_in_time_wait_is_free():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = listener.accept()
    conn.close()  # the server's end closes first: it waits in TIME_WAIT, as a stopped service's do
    listener.close()
    client.close()

    def plain_bind_refused() -> bool:
        with socket.socket() as plain:
            try:
                plain.bind(("127.0.0.1", port))
            except OSError:
                return True
            return False

    assert eventually(plain_bind_refused, timeout=5, interval=0.05)  # the TIME_WAIT is there
    assert not ports.in_use("127.0.0.1", port)  # and gRPC's bind (SO_REUSEADDR) would succeed


def test_a_listener_on_any_address_takes_the_port_on_loopback_and_the_reverse():
    for held, asked in (("0.0.0.0", "127.0.0.1"), ("127.0.0.1", "0.0.0.0")):
        with socket.create_server((held, 0)) as listener:
            assert ports.in_use(asked, listener.getsockname()[1])


def test_an_address_family_this_kernel_lacks_is_no_error_only_not_in_use(monkeypatch):
    # A kernel with IPv6 turned off still resolves "localhost" to ::1; its socket() fails.
    unsupported = (socket.AF_APPLETALK, socket.SOCK_STREAM, 0, "", ("::1", 0))
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: [unsupported])
    assert not ports.in_use("localhost", 50051)


def test_a_benchmark_s_run_of_ports_steps_past_one_another_process_holds():
    base = free_port_run(30)  # room for two runs of 15
    assert ports.free_run("127.0.0.1", base, 15, step=15) == base
    with socket.create_server(("127.0.0.1", base + 7)):
        assert ports.free_run("127.0.0.1", base, 15, step=15) == base + 15
        with pytest.raises(OSError, match="no 15 free ports in a row"):
            ports.free_run("127.0.0.1", base, 15, step=15, tries=1)
