"""`pdserve up`: the suite's shape, and the supervision of its processes.

The supervised children here are tiny grpc.health.v1 servers written inline
(not pdserve services, but reporting the instance id the launcher gives them,
as pdserve's own health service does), so readiness, log relay, shutdown and
failure handling are checked in seconds without loading a model.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import sys
import threading
import time

import pytest

from pdserve import launcher
from pdserve.launcher import Service, Suite, SuiteError

# argv: port, seconds before SERVING, seconds before exiting with code 3 (<0: never),
# and whether to ignore SIGTERM.
HEALTH_SERVER = """
import os, signal, sys, time
from concurrent import futures
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
class Health(health.HealthServicer):
    def Check(self, request, context):
        context.set_trailing_metadata((("pdserve-instance-id", os.environ["PDSERVE_INSTANCE_ID"]),))
        return super().Check(request, context)
port, ready_after, die_after, stubborn = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"
def on_term(*_):
    print("got SIGTERM", flush=True)
    if not stubborn:
        sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
server = grpc.server(futures.ThreadPoolExecutor(2))
servicer = Health()
servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # grpc's default is SERVING
health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
server.add_insecure_port(f"127.0.0.1:{port}")
server.start()
print("listening", flush=True)
time.sleep(ready_after)
servicer.set("", health_pb2.HealthCheckResponse.SERVING)
start = time.monotonic()
while die_after < 0 or time.monotonic() - start < die_after:
    time.sleep(0.05)
print("crashing", flush=True)
sys.exit(3)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child(name: str, stage: int, *, ready_after=0.0, die_after=-1.0, stubborn=False) -> Service:
    port = free_port()
    argv = (sys.executable, "-c", HEALTH_SERVER, str(port), str(ready_after), str(die_after), str(int(stubborn)))
    return Service(name, argv, f"127.0.0.1:{port}", stage)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    launcher.add_up_args(parser)
    return parser.parse_args(argv)


def test_flags_and_defaults():
    from pdserve.launcher.auto import resolve_mode

    args = parse()
    assert (args.mode, args.prefill, args.decode, args.host, args.port, args.base_port) == (
        "auto",
        None,
        None,
        "127.0.0.1",
        50051,
        50061,
    )
    assert resolve_mode(args) == "auto" and args.plan_workload == "mixed"
    assert resolve_mode(parse("--prefill", "2", "--decode", "2")) == "disaggregated"  # counts name a topology
    assert resolve_mode(parse("--mode", "colocated", "--decode", "2")) == "colocated"
    assert args.kvstore is True and args.ready_timeout == 300 and args.log_dir is None
    assert parse("--kvstore").kvstore and not parse("--no-kvstore").kvstore
    with pytest.raises(SystemExit):
        parse("--mode", "bogus")


def test_disaggregated_plan():
    services = launcher.plan("disaggregated", 2, 1, model="/m", kv_cache_gib=0.5, threads=2, python="py")
    by_name = {s.name: s for s in services}
    assert [s.name for s in services] == ["model", "prefill-0", "prefill-1", "decode-0", "kvstore", "router"]
    assert [s.stage for s in services] == [0, 1, 1, 1, 1, 2]  # model, then workers and store, then router
    assert by_name["prefill-1"].argv == (
        "py",
        "-m",
        "pdserve",
        "serve",
        "prefill",
        "--host",
        "127.0.0.1",
        "--metrics-port",
        "-1",
        "--port",
        "50062",
        "--worker-id",
        "prefill-1",
        "--model",
        "/m",
        "--kv-cache-gib",
        "0.5",
        "--threads",
        "2",
        "--grace-s",
        "10",
        "--kvstore",
        "127.0.0.1:50064",
    )
    assert by_name["kvstore"].argv[-6:] == (
        "--port",
        "50064",
        "--model",
        "/m",
        "--dtype",
        launcher.topology.precision.resolve("auto").dtype,
    )
    assert by_name["decode-0"].argv[-2:] == ("--kvstore", "127.0.0.1:50064")
    assert "kvstore" not in [s.name for s in launcher.plan("disaggregated", 1, 1, kvstore=False, python="py")]
    router = " ".join(by_name["router"].argv)
    assert "--mode disaggregated" in router and "--port 50051" in router
    assert "--prefill-targets 127.0.0.1:50061 127.0.0.1:50062 --decode" in router
    assert "--decode-targets 127.0.0.1:50063" in router
    assert by_name["router"].argv[-2:] == ("--http-port", "8000") and by_name["router"].http == "127.0.0.1:8000"
    assert launcher.plan("disaggregated", 1, 1, http_port=-1, python="py")[-1].argv[-2:] == ("--http-port", "-1")


def test_an_elastic_plan_starts_elastic_workers_in_their_first_roles_and_a_balancing_router():
    balance = ("--balance-profile", "/p.json", "--slo-ttft-ms", "3000", "--slo-tpot-ms", "150")
    services = launcher.plan("disaggregated", 1, 1, threads=1, python="py", elastic=True, balance=balance)
    by_name = {s.name: s for s in services}
    assert by_name["prefill-0"].argv[4:5] == by_name["decode-0"].argv[4:5] == ("elastic",)
    assert by_name["prefill-0"].argv[-4:] == ("--role", "prefill", "--kvstore", "127.0.0.1:50063")
    assert by_name["decode-0"].argv[-4:-2] == ("--role", "decode")
    assert " ".join((*balance, "--balance-threads", "1")) in " ".join(by_name["router"].argv)
    with pytest.raises(ValueError, match="elastic"):
        launcher.plan("colocated", 0, 2, python="py", elastic=True)


def test_a_device_list_is_dealt_out_to_the_model_workers_in_turn():
    def devices(*shape, **kw):
        return {
            s.name: s.argv[s.argv.index("--device") + 1] if "--device" in s.argv else None
            for s in launcher.plan(*shape, python="py", **kw)
        }

    assert devices("disaggregated", 2, 2, device="cuda:0,cuda:1") == {
        "model": None,
        "prefill-0": "cuda:0",
        "prefill-1": "cuda:1",
        "decode-0": "cuda:0",
        "decode-1": "cuda:1",
        "kvstore": None,
        "router": None,
    }  # the store and the router need no GPU
    assert set(devices("colocated", 1, 3, device="cuda").values()) == {None, "cuda"}
    assert set(devices("disaggregated", 1, 1).values()) == {None}  # the worker's own default (cpu)


def test_workers_share_the_machine_s_cores_unless_told_otherwise(monkeypatch):
    monkeypatch.setattr(launcher.topology.os, "sched_getaffinity", lambda pid: set(range(8)))

    def threads(*shape, **kw):
        return {
            s.argv[s.argv.index("--threads") + 1]
            for s in launcher.plan(*shape, python="py", **kw)
            if s.name.startswith(("prefill", "decode"))
        }

    assert threads("disaggregated", 1, 1) == {"4"}
    assert threads("disaggregated", 2, 3) == {"1"}
    assert threads("colocated", 1, 2) == {"4"}  # colocated plans no prefill workers
    assert threads("colocated", 1, 16) == {"1"}  # never none
    assert threads("disaggregated", 1, 1, threads=0) == {"0"}  # torch's own default


def test_metrics_ports_follow_the_router_and_stay_clear_of_grpc_ports():
    services = launcher.plan("disaggregated", 2, 1, metrics_port=9500, python="py")
    metrics = {s.name: s.metrics for s in services if s.address}
    assert metrics == {
        "router": "127.0.0.1:9500",
        "prefill-0": "127.0.0.1:9501",
        "prefill-1": "127.0.0.1:9502",
        "decode-0": "127.0.0.1:9503",
        "kvstore": "127.0.0.1:9504",
    }
    for s in services:
        if s.address:
            assert s.argv[s.argv.index("--metrics-port") + 1] == s.metrics.rsplit(":", 1)[1]
    # off by default (tests and benchmarks run several suites at once): every child is told so
    assert all(
        s.argv[s.argv.index("--metrics-port") + 1] == "-1" and s.metrics is None
        for s in launcher.plan(python="py")
        if s.address
    )
    assert parse().metrics_port == 9464  # `pdserve up` serves them
    with pytest.raises(ValueError, match="metrics-port"):
        launcher.plan("disaggregated", 1, 1, metrics_port=50060, python="py")  # 50061 is prefill-0's


def test_the_http_port_moves_with_the_grpc_ports_and_stays_clear_of_them():
    def router(*shape, **kw):
        return launcher.plan(*shape, python="py", **kw)[-1]

    assert router().http == "127.0.0.1:8000"  # the default suite keeps :8000
    # docs/client.md's example (1 prefill, 1 decode, the store: 52061..52063): the next port
    assert router(port=52051, base_port=52061).argv[-2:] == ("--http-port", "52064")
    assert router(port=50151).http == "127.0.0.1:50152"  # past the router's port when it is the highest
    assert router("colocated", 1, 2, port=40000, base_port=40001).http == "127.0.0.1:40003"  # no store
    assert router(port=52051, base_port=52061, http_port=9000).http == "127.0.0.1:9000"
    assert router(http_port=0).http is None and router(http_port=-1).argv[-2:] == ("--http-port", "-1")
    with pytest.raises(ValueError, match="--http-port 52062 collides with the gRPC ports"):
        launcher.plan(port=52051, base_port=52061, http_port=52062)
    with pytest.raises(ValueError, match="--metrics-port 52064"):  # the derived HTTP port
        launcher.plan(port=52051, base_port=52061, metrics_port=52064)


def test_the_plan_lists_every_port_it_binds_with_the_flag_that_moves_it():
    listens = {
        (listen.host, listen.port, listen.flag)
        for s in launcher.plan(metrics_port=9464, host="0.0.0.0", python="py")
        for listen in s.listens
    }
    assert listens == {
        ("0.0.0.0", 50051, "--port"),
        ("0.0.0.0", 8000, "--http-port"),
        *(("0.0.0.0", p, "--base-port") for p in (50061, 50062, 50063)),
        *(("0.0.0.0", p, "--metrics-port") for p in (9464, 9465, 9466, 9467)),
    }
    any_free = launcher.plan(http_port=0, metrics_port=0, python="py")
    assert {listen.flag for s in any_free for listen in s.listens} == {"--port", "--base-port"}


def test_the_router_s_http_port_variable_reaches_the_launcher(monkeypatch):
    suite = Suite(port=40000, base_port=40001, env={"PDSERVE_HTTP_PORT": "0"}, python="py")
    assert suite.services[-1].argv[-2:] == ("--http-port", "0")  # the flag the launcher passes agrees
    monkeypatch.setenv("PDSERVE_HTTP_PORT", "eighty")
    assert launcher.run_up(parse()) == 2  # refused before anything starts


@pytest.mark.parametrize("grace", [15.0, 8.0, 3.0])
def test_the_router_and_workers_drain_within_the_launchers_grace(grace):
    from pdserve.router.shutdown import LAST_WORDS_S

    for service in launcher.plan(grace_s=grace):  # the workers too (they took their own 10 s)
        if service.name in ("router", "prefill-0", "decode-0"):
            drain = float(service.argv[service.argv.index("--grace-s") + 1])
            assert drain == max(0.0, grace - LAST_WORDS_S)
            assert drain + LAST_WORDS_S <= max(grace, LAST_WORDS_S)


def test_colocated_plan_and_validation():
    services = launcher.plan("colocated", 5, 2, host="0.0.0.0", python="py")
    assert [s.name for s in services] == ["model", "decode-0", "decode-1", "router"]
    assert services[1].argv[-2:] == ("--role", "colocated") and services[1].address == "127.0.0.1:50061"
    router = " ".join(services[-1].argv)
    assert "--prefill-targets" not in router and "--mode colocated" in router and "--host 0.0.0.0" in router
    with pytest.raises(ValueError, match="prefill"):
        launcher.plan("disaggregated", 0, 1)
    with pytest.raises(ValueError, match="collides"):
        launcher.plan(port=50062)
    assert launcher.run_up(parse("--decode", "0")) == 2


def test_waits_for_health_then_stops_cleanly(tmp_path):
    out = io.StringIO()
    late, first = child("worker", 1, ready_after=0.8), child("front", 2)
    suite = Suite(services=[late, first], out=out, log_dir=tmp_path, ready_timeout=20, grace_s=5)
    t0 = time.monotonic()
    with suite:
        assert time.monotonic() - t0 >= 0.8  # waited for SERVING, not just for the port
        procs = dict(suite._procs)
        assert all(p.poll() is None for p in procs.values())
    assert [p.returncode for p in procs.values()] == [0, 0]  # SIGTERM, clean exit
    log = out.getvalue()
    assert "[worker] listening" in log and "[front] got SIGTERM" in log and "worker is serving at" in log
    assert log.index("worker is serving") < log.index("[front] listening")  # stages in order
    assert "got SIGTERM" in (tmp_path / "worker.log").read_text()


def test_unexpected_death_stops_the_suite_with_exit_1():
    out = io.StringIO()
    suite = Suite(
        services=[child("bystander", 1), child("doomed", 2, die_after=2.0)], out=out, ready_timeout=20, grace_s=5
    )
    suite.start()
    assert suite.wait(threading.Event()) == 1
    suite.stop()
    assert "doomed exited unexpectedly with code 3" in out.getvalue()
    assert suite._procs["bystander"].returncode == 0


def test_death_before_ready_and_stubborn_child_is_killed():
    out = io.StringIO()
    never = Service("broken", (sys.executable, "-c", "import sys; print('bad config'); sys.exit(2)"), "127.0.0.1:1", 1)
    stubborn = child("stubborn", 0, stubborn=True)
    suite = Suite(services=[stubborn, never], out=out, ready_timeout=20, grace_s=0.5)
    with pytest.raises(SuiteError, match="broken exited with code 2 before it was ready"):
        suite.start()
    assert "[broken] bad config" in out.getvalue()
    assert suite._procs["stubborn"].returncode == -signal.SIGKILL  # ignored SIGTERM for the grace period
    assert "stubborn did not stop within 0.5s; killing it" in out.getvalue()


def _supervised_until_sigterm(suite: Suite, out: io.StringIO) -> int:
    """supervise(suite), sent SIGTERM once it says it is ready, as an init system or `kill` would."""

    def terminate_when_ready():
        deadline = time.monotonic() + 20
        while "ready; clients connect" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=terminate_when_ready, daemon=True)
    sender.start()
    code = launcher.supervise(suite)
    sender.join()
    return code


def test_supervise_stops_on_sigterm():
    out = io.StringIO()
    suite = Suite(services=[child("router", 0)], out=out, ready_timeout=20, grace_s=5)
    assert _supervised_until_sigterm(suite, out) == 0
    assert "ready; clients connect to 127.0.0.1:" in out.getvalue() and "[router] got SIGTERM" in out.getvalue()
    assert suite._procs["router"].returncode == 0


class _PipeClosedAfterReady(io.StringIO):
    """`pdserve up | tee log`, and Ctrl-C stops tee too: every write after start-up fails."""

    def write(self, text: str) -> int:
        if "ready; clients connect" in self.getvalue():
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(text)


def test_a_launcher_whose_output_is_gone_still_stops_every_service():
    out = _PipeClosedAfterReady()
    suite = Suite(services=[child("router", 0)], out=out, ready_timeout=20, grace_s=5)
    assert _supervised_until_sigterm(suite, out) == 0
    assert suite._procs["router"].returncode == 0  # stopped, not left serving without a launcher


def test_cpu_workers_get_cores_of_their_own_when_their_threads_fit(monkeypatch):
    def cpus(cores, *shape, **kw):
        monkeypatch.setattr(launcher.topology.os, "sched_getaffinity", lambda pid: set(cores))
        return {
            s.name: s.argv[s.argv.index("--cpus") + 1] if "--cpus" in s.argv else None
            for s in launcher.plan(*shape, python="py", **kw)
            if s.name.startswith(("prefill", "decode"))
        }

    assert cpus(range(2), "disaggregated", 1, 1) == {"prefill-0": "0", "decode-0": "1"}
    assert cpus(range(8), "disaggregated", 1, 1) == {"prefill-0": "0,1,2,3", "decode-0": "4,5,6,7"}
    assert cpus([2, 5, 7], "disaggregated", 2, 1, threads=1) == {"prefill-0": "2", "prefill-1": "5", "decode-0": "7"}
    assert cpus(range(2), "colocated", 0, 1) == {"decode-0": None}  # one worker: all the cores anyway
    assert cpus(range(2), "disaggregated", 1, 1, threads=2) == {"prefill-0": None, "decode-0": None}  # 4 > 2
    assert cpus(range(2), "disaggregated", 1, 1, threads=0) == {"prefill-0": None, "decode-0": None}
    assert cpus(range(2), "disaggregated", 1, 1, pin=False) == {"prefill-0": None, "decode-0": None}
    assert cpus(range(2), "colocated", 0, 1, pin=True) == {"decode-0": "0,1"}
    with pytest.raises(ValueError, match="do not fit one to a core"):
        cpus(range(2), "disaggregated", 1, 1, threads=2, pin=True)
    assert all(
        s.argv.count("--cpus") == 0
        for s in launcher.plan("disaggregated", 1, 1, python="py")
        if s.name in ("router", "kvstore")
    )


@pytest.mark.parametrize(
    "argv, says",
    [
        (("--mode", "colocated", "--prefill", "2"), "--prefill: for a disaggregated suite, not --mode colocated"),
        (("--mode", "colocated", "--elastic"), "--elastic: for a disaggregated suite"),
        (("--port", "0"), "--port: a port in [1, 65535], got 0"),  # the launcher could not dial it
        (("--base-port", "70000"), "--base-port: a port in [1, 65535]"),
        (("--grace", "-5"), "--grace >= 0"),
        (("--restart-limit", "-1"), "--restart-limit >= 0"),
    ],
)
def test_a_flag_its_mode_would_ignore_or_a_value_out_of_range_is_refused_naming_it(argv, says, capsys):
    assert launcher.run_up(parse(*argv)) == 2
    assert says in capsys.readouterr().err


def test_the_launcher_plans_with_the_workers_own_settings_where_its_flags_leave_them_out(monkeypatch):
    from pdserve.launcher import up_args

    monkeypatch.setenv("PDSERVE_DTYPE", "float32")  # what the workers will run in
    args = parse("--prefill", "1", "--decode", "1")
    up_args.from_worker_settings(args)
    assert (args.dtype, args.model, args.device, args.quantization) == ("float32", None, None, None)
    store = next(s for s in launcher.plan(dtype=args.dtype) if s.name == "kvstore")
    assert store.argv[store.argv.index("--dtype") + 1] == "float32"  # blocks of the workers' size
    args = parse("--dtype", "bfloat16")
    up_args.from_worker_settings(args)
    assert args.dtype == "bfloat16"  # a flag still wins, as it does for the workers
    monkeypatch.setenv("PDSERVE_DTYPE", "float64")
    assert launcher.run_up(parse()) == 2  # refused naming a child that reads it, before anything starts


def test_an_ipv6_host_is_dialled_in_brackets():
    from pdserve.common.ports import host_port

    services = {s.name: s for s in launcher.plan("disaggregated", 1, 1, host="::1", metrics_port=9464)}
    assert services["decode-0"].address == "[::1]:50062" and services["router"].metrics == "[::1]:9464"
    router = services["router"].argv
    assert router[router.index("--decode-targets") + 1] == "[::1]:50062"  # "::1:50062" did not resolve
    prefill = services["prefill-0"].argv
    assert prefill[prefill.index("--kvstore") + 1] == "[::1]:50063"
    assert (host_port("::1", 1), host_port("[::1]", 1), host_port("10.0.0.1", 1)) == (
        "[::1]:1",
        "[::1]:1",
        "10.0.0.1:1",
    )


def test_a_second_up_on_a_port_a_live_suite_holds_is_refused_and_leaves_its_state_file(tmp_path, monkeypatch, capsys):
    import json
    import subprocess

    from pdserve.launcher import run_state

    monkeypatch.setenv("PDSERVE_RUN_DIR", str(tmp_path))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a launcher still loading
    try:
        path = run_state.state_path(40100)
        path.parent.mkdir(parents=True)
        state = {"launcher_pid": other.pid, "launcher_started": run_state.started(other.pid), "services": []}
        path.write_text(json.dumps(state))
        assert launcher.run_up(parse("--port", "40100", "--base-port", "40101")) == 2
        assert f"a suite already runs on --port 40100 (pdserve up, pid {other.pid})" in capsys.readouterr().err
        run_state.remove_own(path)  # what a launcher's exit does: another's file stays
        assert path.exists()
        path.write_text(json.dumps({**state, "launcher_pid": os.getpid()}))
        run_state.remove_own(path)
        assert not path.exists()
    finally:
        other.kill()
        other.wait()


def test_status_of_another_hosts_router_does_not_read_this_machines_suite(tmp_path, monkeypatch, capsys):
    import json
    import subprocess

    from pdserve.launcher import run_state, status

    monkeypatch.setenv("PDSERVE_RUN_DIR", str(tmp_path))
    here = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a local suite on 40200
    try:
        path = run_state.state_path(40200)
        path.parent.mkdir(parents=True)
        service = {"name": "decode-0", "role": "decode", "address": "127.0.0.1:40201", "phase": "serving",
                   "restarts": 0, "started_at": 0.0, "version": "x"}  # fmt: skip
        path.write_text(json.dumps({"launcher_pid": here.pid, "launcher_started": run_state.started(here.pid),
                                    "services": [service]}))  # fmt: skip
        args = argparse.Namespace(target="192.0.2.1:40200", json=True)  # TEST-NET: not this machine
        monkeypatch.setattr(status, "ask_router", lambda target: (None, "UNAVAILABLE: no route"))
        assert status.run_status(args) == 1
        assert json.loads(capsys.readouterr().out)["services"] == []  # not the local decode-0
        assert status.run_status(argparse.Namespace(target="localhost:40200", json=True)) == 1
        assert [r["name"] for r in json.loads(capsys.readouterr().out)["services"]] == ["decode-0"]
    finally:
        here.kill()
        here.wait()
