"""The row kernel's weights (or float32 panels) in one mapping, in the order a decode step reads them,
moved into huge pages once the worker is warm.

A one-sequence step reads its ~120 weights one after another and is bound by that read: from one
huge-page mapping it read them 5-9% faster than from separate 4 KB-paged allocations. Faulting the
huge pages in at load added 0.3-0.9 s to a worker's start, so the mapping starts on 4 KB pages and is
collapsed after the warm-up, on a thread of its own (docs/engine.md, "Weights in huge pages").
"""

from __future__ import annotations

import logging
import threading
import time

import torch
from torch import nn

from pdserve.common.kv import host_memory

log = logging.getLogger(__name__)


def gather(layers: list[nn.Module], model: nn.Module) -> torch.Tensor | None:
    """Every `layers[i].weight` moved, in that order, into one collapsible mapping; the mapping, or
    None where the weights differ in dtype. A parameter sharing a moved weight (a tied head's
    embedding) moves with it, so the head still reads the embedding in place."""
    if not layers or len({m.weight.dtype for m in layers}) != 1:
        return None
    arena = host_memory.collapsible(sum(m.weight.numel() for m in layers), layers[0].weight.dtype)
    params = list(model.parameters())
    offset = 0
    for m in layers:
        old = m.weight
        view = arena[offset : offset + old.numel()].view_as(old)
        view.copy_(old)
        offset += old.numel()
        for p in params:
            if p.data_ptr() == old.data_ptr() and p.shape == old.shape:
                p.data = view
        m.weight = view
    host_memory.trim_heap()  # the weights' copies before the arena (and the panels' packing) are freed
    return arena


def collapse(arena: torch.Tensor) -> str:
    """The arena into huge pages now; "" when done, else why not."""
    t = time.perf_counter()
    why = host_memory.collapse(arena)
    mb = arena.numel() * arena.element_size() / 1e6
    if why:
        log.info("weights stay on 4 KB pages (%s)", why)
    else:
        log.info("weights: %.0f MB moved into huge pages in %.2f s", mb, time.perf_counter() - t)
    return why


def collapse_in_background(arena: torch.Tensor) -> threading.Thread:
    """collapse(arena) on a daemon thread: steps go on reading the weights while it runs."""
    thread = threading.Thread(target=collapse, args=(arena,), name="pdserve-weights-to-huge-pages", daemon=True)
    thread.start()
    return thread
