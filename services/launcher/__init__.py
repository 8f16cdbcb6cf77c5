"""`pdserve up`: the whole suite on this machine, one OS process per service.

`Suite` checks every port, prepares the model, then starts workers and router, each stage once the previous
one reports SERVING; `pdserve up` also restarts what crashes. Guide: docs/client.md, docs/reliability.md.
In tests (no restarts): `with Suite(mode="colocated", decode=2) as suite: Client(suite.router_target)`.
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


__all__ = [
    "MODES",
    "Listen",
    "PortInUseError",
    "Service",
    "Suite",
    "SuiteError",
    "add_commands",
    "add_up_args",
    "plan",
    "run_up",
    "supervise",
]
