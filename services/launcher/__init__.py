"""`pdserve up`: the whole suite on this machine, one OS process per service.

First every port the suite will listen on is tried: one that another process
holds is refused before anything starts. Stages: prepare the model once
(workers would race to convert it), then the workers, then the router, each
stage once the previous one reports SERVING on grpc.health.v1 with the
instance id the launcher gave it (an answer from another process on the same
port never counts). Output is relayed as `[name] line`. A service that exits
on its own is started again with backoff, and given up after a crash loop
(`supervisor`); SIGHUP (`pdserve restart --rolling`) drains and restarts the
workers one at a time. Ctrl-C / SIGTERM stop the stages in reverse (the router
first: no new request reaches a worker that is going away): SIGTERM, a grace
period, SIGKILL. In tests and benchmarks, with no restarts:
`with Suite(mode="colocated", decode=2) as suite: Client(suite.router_target)`.
"""

from pdserve.common.ports import Listen
from pdserve.launcher.suite import PortInUseError, Suite, SuiteError
from pdserve.launcher.topology import MODES, Service, plan
from pdserve.launcher.up import add_up_args, run_up, supervise


def add_commands(sub) -> None:
    """`pdserve up`, `pdserve status` and `pdserve restart`."""
    from pdserve.launcher import status

    up = sub.add_parser("up", help="start the whole suite locally")
    add_up_args(up)
    up.set_defaults(func=run_up)
    status.add_commands(sub)


__all__ = ["MODES", "Listen", "PortInUseError", "Service", "Suite", "SuiteError", "add_commands", "add_up_args",
           "plan", "run_up", "supervise"]
