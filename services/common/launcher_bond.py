"""A service `pdserve up` started ends with it: SIGTERM when the launcher dies, even by SIGKILL.

Each service runs in a process group of its own (a terminal's Ctrl-C reaches only the launcher,
which stops them in order), so nothing else would stop them: a SIGKILLed launcher left its suite
serving, unsupervised, holding its ports. Linux's PR_SET_PDEATHSIG, asked for by the service
itself at start (the launcher's `preexec_fn` would be unsafe beside its log threads).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Mapping

LAUNCHER_PID_ENV = "PDSERVE_LAUNCHER_PID"  # set by the launcher for the services it starts
_PR_SET_PDEATHSIG = 1


def follow_launcher(environ: Mapping[str, str] = os.environ) -> bool:
    """Have this process sent SIGTERM when its parent dies, if a launcher started it; True if asked."""
    pid = environ.get(LAUNCHER_PID_ENV, "")
    if not pid.isdigit() or not sys.platform.startswith("linux"):
        return False
    try:
        if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    try:  # it may have died before the request took: then no signal ever comes
        os.kill(int(pid), 0)
    except ProcessLookupError:
        os.kill(os.getpid(), signal.SIGTERM)
    except PermissionError:
        pass  # alive, another user's (a pid taken again): not ours to judge
    return True
