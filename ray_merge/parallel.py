"""Threads: how many the merge uses, how they wait, and a pool for work torch does not spread itself.

Torch ops on large enough tensors run on all of torch's threads (OpenMP): every op is a parallel
region that ends when its slowest thread is done. By default OpenMP threads spin while they wait for
the next region, which is cheap on idle cores but ruinous when the cores are shared: a spinning
thread burns the time slice its descheduled partner needs, and a merge of many small ops then
receives a fraction of its fair CPU share (measured: linear on a 1.1B model went from 2-3x faster
than mergekit idle to 0.4x with the 2 cores 4x oversubscribed). ``set_thread_defaults`` makes
waiting threads sleep instead (OMP_WAIT_POLICY=PASSIVE) and sizes the thread count to the CPUs this
process may actually use (affinity mask and cgroup quota), before torch is imported.

``map_ordered`` runs independent pieces (numpy calls such as random-number generation) on a shared
pool and returns their results in order, so nothing depends on the number of threads. A piece
started from a pool thread runs inline: nesting never deadlocks.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Optional, TypeVar

T = TypeVar("T")

_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0
_lock = threading.Lock()
_in_pool = threading.local()


def _cgroup_cpu_limit(root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> Optional[float]:
    """The CPU quota of this process's cgroup in CPUs (e.g. 1.5), or None when it has none."""
    limits = []
    try:
        with open(proc_cgroup, encoding="utf-8") as f:
            entries = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    for entry in entries:
        if len(entry) != 3:
            continue
        _, controllers, path = entry
        if controllers == "":  # cgroup v2: cpu.max = "<quota> <period>" or "max <period>", in every ancestor
            parts = [p for p in path.split("/") if p]
            for depth in range(len(parts), -1, -1):
                limit = _read_quota(os.path.join(root, *parts[:depth], "cpu.max"))
                if limit is not None:
                    limits.append(limit)
        elif "cpu" in controllers.split(","):  # cgroup v1: cpu.cfs_quota_us (-1: none) and cpu.cfs_period_us
            for base in (os.path.join(root, controllers), os.path.join(root, "cpu")):
                d = os.path.join(base, path.lstrip("/"))
                limit = _read_quota(os.path.join(d, "cpu.cfs_quota_us"), os.path.join(d, "cpu.cfs_period_us"))
                if limit is not None:
                    limits.append(limit)
                    break
    return min(limits) if limits else None


def _read_quota(path: str, period_path: Optional[str] = None) -> Optional[float]:
    try:
        with open(path, encoding="utf-8") as f:
            fields = f.read().split()
        if period_path is not None:
            with open(period_path, encoding="utf-8") as f:
                fields.append(f.read().strip())
        quota, period = fields[0], float(fields[1])
    except (OSError, IndexError, ValueError):
        return None
    if quota in ("max", "-1") or period <= 0:
        return None
    try:
        return float(quota) / period
    except ValueError:
        return None


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by its cgroup's CPU quota (containers)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_limit()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def set_thread_defaults(environ: Optional[dict] = None) -> None:
    """Before torch is imported: OpenMP threads that sleep while they wait, as many as the usable CPUs.

    Values the user set are kept. Ray workers started from this process inherit them.
    """
    env = os.environ if environ is None else environ
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cpus = str(available_cpus())
    env.setdefault("OMP_NUM_THREADS", cpus)
    env.setdefault("MKL_NUM_THREADS", env["OMP_NUM_THREADS"])


def memory_bound_threads() -> int:
    """Intra-op threads for memory-bound work (element-wise merges, the NaN/inf scan) streamed beside the reader
    and writer threads: one fewer than the cores, whose page-cache copies need one."""
    return max(1, threads() - 1)


@contextmanager
def intra_op_threads(n: int):
    """Run the enclosed torch ops with ``n`` intra-op threads (at least 1), then restore the count."""
    import torch

    n = max(1, n)
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _mark_pool_thread() -> None:
    _in_pool.active = True


def threads() -> int:
    """How many threads work on one tensor: torch's intra-op thread count."""
    import torch  # here, not above: set_thread_defaults must run before torch is imported

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
