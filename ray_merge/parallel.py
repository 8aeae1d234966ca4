"""Spread the work on one tensor over the CPU cores, in cache-sized pieces.

Merging is memory-bound: torch ops over whole tensors stream every operand
through RAM once per op. Methods instead walk a tensor in pieces small enough to
stay in cache, and this module runs those pieces on a pool of threads (torch
releases the GIL). Pieces are ranges of a flat tensor (or rows); each thread
does a contiguous run of them, and results come back in order, so nothing
depends on how many threads there are.

Each piece stays below torch's own parallel grain, so ops run on the calling
thread without OpenMP barriers (which stall badly when cores are shared). A
piece started from inside a pool thread runs inline: nesting never deadlocks.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Optional, TypeVar

import torch

T = TypeVar("T")

_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0
_lock = threading.Lock()
_in_pool = threading.local()


def _mark_pool_thread() -> None:
    _in_pool.active = True


def threads() -> int:
    """How many threads work on one tensor: torch's intra-op thread count."""
    return max(1, torch.get_num_threads())


def _get_pool() -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size != threads():
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool_size = threads()
            _pool = ThreadPoolExecutor(_pool_size, thread_name_prefix="ray-merge-block",
                                       initializer=_mark_pool_thread)
        return _pool


def serial() -> bool:
    """Whether work started now runs inline (one thread, or already on a pool thread)."""
    return threads() == 1 or getattr(_in_pool, "active", False)


def map_ordered(fn: Callable[..., T], items: Iterable) -> list[T]:
    """``[fn(i) for i in items]``, spread over the pool; results in item order."""
    items = list(items)
    if len(items) <= 1 or serial():
        return [fn(i) for i in items]
    return list(_get_pool().map(fn, items))


def spans(n: int, piece: int) -> list[tuple[int, int]]:
    """``[0, n)`` as one contiguous span per thread, each a whole number of ``piece``s
    (but the last), so that each thread's pieces line up with a serial walk."""
    pieces = -(-n // piece) if n else 0
    parts = 1 if serial() else min(threads(), pieces)
    if parts <= 1:
        return [(0, n)]
    per = -(-pieces // parts)
    return [(p * per * piece, min(n, (p + 1) * per * piece)) for p in range(parts) if p * per * piece < n]


def over_spans(fn: Callable[[int, int], T], n: int, piece: int) -> list[T]:
    """``fn(start, stop)`` for each span of ``spans(n, piece)``, in parallel; results in order."""
    return map_ordered(lambda span: fn(*span), spans(n, piece))
