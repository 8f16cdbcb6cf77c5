"""`pdserve up` keeps serving when a service crashes: it is started again with
backoff, a crash loop is given up, and the suite stops only when what is left
cannot serve. The children are the inline health servers of test_launcher."""

from __future__ import annotations

import contextlib
import io
import signal
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest

from pdserve.common.auth import AUTHORIZATION_KEY, ApiKeys
from pdserve.common.errors import UnauthenticatedError
from pdserve.launcher import Service, Suite
from pdserve.launcher.restarts import Phase, RestartPolicy, ServiceState, usable
from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from tests.unit.test_launcher import child, free_port

FAST = RestartPolicy(backoff_s=0.1, max_backoff_s=0.4, limit=3, window_s=60)


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@contextlib.contextmanager
def supervised(suite: Suite):
    """`suite` started and supervised in a thread, as `pdserve up` does; stopped at the end. Yields the thread."""
    stop = threading.Event()
    suite.start()
    runner = threading.Thread(target=lambda: setattr(suite, "code", suite.wait(stop)))
    runner.start()
    try:
        yield runner
    finally:
        stop.set()
        runner.join()
        suite.stop()


def as_role(service: Service, role: str) -> Service:
    return Service(service.name, service.argv, service.address, service.stage, role=role)


def test_backoff_doubles_to_its_cap_and_the_limit_within_the_window_gives_up():
    policy = RestartPolicy(backoff_s=0.5, max_backoff_s=1.5, limit=4, window_s=10)
    state = ServiceState()
    assert [state.exited(1, policy, now=t) for t in (0, 1, 2)] == [0.5, 1.0, 1.5]
    assert state.phase is Phase.BACKOFF and state.last_exit == 1
    assert state.exited(1, policy, now=3) is None and state.phase is Phase.GIVEN_UP
    spread = ServiceState()  # exits further apart than the window never add up to a loop
    assert all(spread.exited(1, policy, now=t) == 0.5 for t in (0, 11, 22, 33, 44))


def test_the_suite_needs_its_router_and_one_decode_worker_but_no_prefill_worker_or_store():
    roles = {
        "prefill-0": "prefill",
        "decode-0": "decode",
        "decode-1": "decode",
        "kvstore": "kvstore",
        "router": "router",
    }
    assert usable(roles, {"prefill-0", "kvstore", "decode-1"}) is None
    assert usable(roles, {"decode-0", "decode-1"}) == "every decode worker was given up"
    assert usable(roles, {"router"}) == "router was given up"
    assert usable({"front": ""}, {"front"}) == "front was given up"


def test_a_killed_service_is_started_again_and_serves_while_the_rest_never_stopped():
    out = io.StringIO()
    bystander, victim = child("bystander", 1), child("victim", 1)
    suite = Suite(services=[bystander, victim], out=out, ready_timeout=20, grace_s=5, restarts=FAST)
    with supervised(suite):
        first, bystanding = suite.signal("victim", signal.SIGKILL), suite._procs["bystander"]
        wait_for(lambda: "victim is serving again (restart 1)" in out.getvalue())
        assert suite._procs["victim"] is not first and suite._procs["victim"].poll() is None
        assert suite._procs["bystander"] is bystanding and bystanding.poll() is None
        assert f"victim exited unexpectedly with code {-signal.SIGKILL}; starting it again in 0.1s" in out.getvalue()
        assert suite.supervisor.states["victim"].restarts == 1
    assert suite.code == 0


def test_a_worker_that_crashes_at_every_start_is_given_up_and_the_others_serve_on():
    out = io.StringIO()
    steady = as_role(child("decode-0", 1), "decode")
    doomed = Service(
        "decode-1",
        (sys.executable, "-c", "import sys; print('bad weights'); sys.exit(1)"),
        f"127.0.0.1:{free_port()}",
        1,
        role="decode",
    )
    front = as_role(child("router", 2), "router")  # a later stage: not started when decode-1 is given up
    suite = Suite(services=[steady, doomed, front], out=out, ready_timeout=30, grace_s=5, restarts=FAST)
    with supervised(suite) as runner:  # started: decode-0 serves, decode-1 is given up
        wait_for(lambda: "giving up on decode-1: 3 exits within 60s (the last with code 1" in out.getvalue())
        assert out.getvalue().count("[decode-1] bad weights") == 3
        assert "serving on without it: decode-0, router" in out.getvalue()
        time.sleep(1.0)  # given up: never started again, and the suite goes on
        assert runner.is_alive() and suite._procs["decode-0"].poll() is None
        assert suite.supervisor.states["decode-1"].phase is Phase.GIVEN_UP
    assert suite.code == 0


def test_a_crash_loop_of_a_service_the_suite_needs_stops_the_suite():
    out = io.StringIO()
    front = child("front", 1, die_after=0.2)
    suite = Suite(services=[front], out=out, ready_timeout=30, grace_s=5, restarts=FAST)
    suite.start()
    assert suite.wait(threading.Event()) == 1
    suite.stop()
    assert "giving up on front: 3 exits within 60s" in out.getvalue()
    assert "front was given up; stopping the suite" in out.getvalue()


def test_a_policy_without_a_limit_is_refused():
    with pytest.raises(ValueError, match="limit >= 1"):
        RestartPolicy(limit=0)


class _KeyedRouter(router_pb2_grpc.RouterServicer):
    """A router's ListWorkers behind API keys, as `pdserve up` starts one with PDSERVE_API_KEYS_FILE."""

    keys = ApiKeys(["secret-key"])

    def ListWorkers(self, request, context):
        try:
            self.keys.check(dict(context.invocation_metadata()).get(AUTHORIZATION_KEY))
        except UnauthenticatedError as e:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        info = common_pb2.WorkerInfo(worker_id="decode-0")
        return router_pb2.ListWorkersResponse(workers=[router_pb2.WorkerStatus(info=info, healthy=True)])


def test_a_rolling_restart_sees_a_worker_back_through_a_router_with_api_keys(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# clients\nsecret-key\n")
    server = grpc.server(futures.ThreadPoolExecutor(2))
    router_pb2_grpc.add_RouterServicer_to_server(_KeyedRouter(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        router = Service("router", ("true",), f"127.0.0.1:{port}", 2, role="router")
        suite = Suite(services=[router], out=io.StringIO(), env={"PDSERVE_API_KEYS_FILE": str(keys)}, restarts=FAST)
        assert suite.supervisor._router_sees("decode-0")  # unauthenticated, it never would: the roll stalls
        suite.supervisor.close()
    finally:
        server.stop(0)
