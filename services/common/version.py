"""pdserve's own version, as installed."""

from __future__ import annotations

import functools
import importlib.metadata


@functools.cache
def software_version() -> str:
    try:
        return importlib.metadata.version("pdserve")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"
