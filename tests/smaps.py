"""How the kernel maps a tensor's memory, from /proc/self/smaps: huge pages, resident bytes."""

from __future__ import annotations

import pytest
import torch


def thp_mode() -> str | None:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    return text.split("[", 1)[1].split("]", 1)[0]


def mapped_bytes(t: torch.Tensor, field: str = "AnonHugePages:") -> int:
    """Bytes of `t`'s address range that smaps counts under `field` (default: mapped with huge pages)."""
    lo, hi, total, inside = t.data_ptr(), t.data_ptr() + t.nbytes, 0, False
    with open("/proc/self/smaps") as f:
        lines = f.readlines()
    for line in lines:
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start < hi and end > lo
        elif inside and head == field:
            total += int(line.split()[1]) * 1024
    return total


needs_thp = pytest.mark.skipif(
    thp_mode() not in ("always", "madvise"), reason=f"transparent huge pages are {thp_mode() or 'absent'} here"
)
