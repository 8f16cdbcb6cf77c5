"""The state file a running `pdserve up` keeps, for `pdserve status` and `pdserve restart`.

One JSON file per suite, named by the router's port, rewritten whole (write and
rename) whenever a service changes phase, and removed when the suite stops.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pdserve.common.version import software_version

if TYPE_CHECKING:
    from pdserve.launcher.suite import Suite


def state_path(router_port: int, environ=os.environ) -> Path:
    """Where the suite whose router listens on `router_port` keeps its state."""
    base = environ.get("PDSERVE_RUN_DIR") or environ.get("XDG_RUNTIME_DIR")
    root = Path(base) / "pdserve" if base else Path.home() / ".cache" / "pdserve" / "run"
    return root / f"up-{router_port}.json"


def snapshot(suite: Suite) -> dict:
    services = []
    for s in suite.services:
        state = suite.supervisor.states.get(s.name)
        if not s.address or state is None:
            continue
        services.append(
            {
                "name": s.name,
                "role": s.role,
                "address": s.address,
                "pid": suite.pid(s.name),
                "phase": state.phase.value,
                "restarts": state.restarts,
                "started_at": state.started_at,
                "last_exit": state.last_exit,
                "version": software_version(),
            }
        )
    return {
        "launcher_pid": os.getpid(),
        "launcher_started": started(os.getpid()),
        "router": suite.router_target,
        "written_at": time.time(),
        "rolling": suite.supervisor.rolling,
        "services": services,
    }


def write(path: Path, suite: Suite) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(snapshot(suite), indent=1))
    partial.replace(path)  # a reader never sees half a file


def started(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (Linux; None elsewhere, or gone):
    with its pid, it names one process, where a pid alone may since be another's."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[19])  # field 22; the name in () may hold spaces
    except (OSError, ValueError, IndexError):
        return None


def read(path: Path) -> dict | None:
    """The state of a live suite, or None (no file, or its launcher is gone: a file a SIGKILL or a
    reboot left, whose pid another process may hold now, is not taken for a launcher to signal)."""
    try:
        state = json.loads(path.read_text())
        pid = state["launcher_pid"]
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if state.get("launcher_started") is not None and started(pid) != state["launcher_started"]:
        return None
    return state


def remove_own(path: Path) -> None:
    """Remove the state file if this process wrote it: not another launcher's, started meanwhile."""
    try:
        if json.loads(path.read_text()).get("launcher_pid") == os.getpid():
            path.unlink(missing_ok=True)
    except (OSError, ValueError, AttributeError):
        pass
