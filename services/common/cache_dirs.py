"""Where pdserve keeps what it makes at run time: converted models, weight digests, kernel builds.

The cache is $PDSERVE_CACHE_DIR, else $XDG_CACHE_HOME/pdserve (~/.cache/pdserve). A container image
may carry it on a read-only filesystem (the Kubernetes manifests' pods): what is there is still
read, and what is new goes to the first folder that can be written, the cache's own, then the
home's cache, then the temporary directory.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pdserve"
    return Path(os.environ.get("PDSERVE_CACHE_DIR") or default)


def writable(sub: str) -> Path:
    """root() / sub, or where that can't be made or written, the same folder under the home's cache
    or the temporary directory; root() / sub where none can (the write then says why)."""
    first = root() / sub
    for folder in (first, Path.home() / ".cache" / "pdserve" / sub, Path(tempfile.gettempdir()) / "pdserve" / sub):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):  # false on a read-only filesystem, even for root
            return folder
    return first
