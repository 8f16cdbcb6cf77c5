"""Waiting in tests for something another process, thread or task does by itself:
poll to a deadline, never sleep a fixed time and hope."""

from __future__ import annotations

import asyncio
import inspect
import time


def eventually(check, timeout: float, interval: float = 0.5):
    """check() until it returns something truthy or `timeout` passes; its last result."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval)


async def settles(check, timeout: float = 10.0, interval: float = 0.05):
    """eventually() for the event loop: check() (a function or a coroutine function) until
    it returns something truthy or `timeout` passes, the loop free meanwhile; its last result."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(interval)
