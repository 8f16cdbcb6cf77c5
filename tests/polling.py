"""Waiting in tests for something another process or thread does by itself."""
from __future__ import annotations

import time


def eventually(check, timeout: float, interval: float = 0.5):
    """check() until it returns something truthy or `timeout` passes; its last result."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval)
