"""A pool of threads for work that torch does not spread over the cores itself.

Torch ops on large enough tensors already run on all cores (OpenMP); numpy
calls such as random-number generation do not. ``map_ordered`` runs such
independent pieces on a shared pool and returns their results in order, so
nothing depends on the number of threads. A piece started from a pool thread
runs inline: nesting never deadlocks.
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
