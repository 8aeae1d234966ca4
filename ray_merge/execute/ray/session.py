"""Connecting to Ray: a local instance we start (and stop), the cluster at an address, or the cluster of
the Ray job we run in; plus small helpers for Ray tasks (resources, errors).
"""
from __future__ import annotations

import os
import shutil
import socket
import sys
from contextlib import contextmanager
from typing import Callable, Iterable, Optional

from ray_merge.errors import UserError


def check_ray_address(address: Optional[str]) -> None:
    """Fail at once when a ``host:port`` Ray address does not answer at all
    (Ray itself would retry for minutes before giving up)."""
    host, sep, port = (address or "").rpartition(":")
    if not (sep and host and port.isdigit()) or "://" in address:
        return  # "auto", ray:// client addresses: left to Ray
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise UserError(f"cannot reach the Ray cluster at {address}: {e.strerror or e} "
                        f"(is `ray start --head` running there?)")


def join_ray_cluster(address: str, **init_kwargs) -> None:
    """``ray.init(address=...)`` with a one-line error when it fails."""
    import ray

    check_ray_address(address)
    try:
        ray.init(address=address, **init_kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot connect to the Ray cluster at {address}: {' '.join(str(e).split())[:300]}")


@contextmanager
def ray_session(spec, verbose: int = 0, object_store_bytes: int = 256 * 2**20):
    """Connect to Ray as the merge executor does (ray_merge.distributed): join the cluster at
    ``spec.address`` (or the one of the Ray job we run in), or start a local instance on
    127.0.0.1 with room for ``spec.workers`` tasks. A session that is already up is reused."""
    import logging
    import math
    import tempfile

    if not spec.remote and "ray" not in sys.modules:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    if ray.is_initialized():
        yield ray
        return
    quiet = dict(logging_level=logging.INFO if verbose >= 2 else logging.WARNING, log_to_driver=verbose >= 1)
    temp_dir = None
    if spec.remote:
        join_ray_cluster(spec.address or "auto", **quiet)
    else:
        n = spec.workers or 1
        temp_dir = tempfile.mkdtemp(prefix="rm-", dir=os.environ.get("RAY_TMPDIR") or "/tmp")
        kw = dict(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(n * spec.cpus)),
                  _node_ip_address="127.0.0.1", include_dashboard=False, _temp_dir=temp_dir,
                  object_store_memory=object_store_bytes, **quiet)
        if spec.resources:
            kw["resources"] = {k: v * n for k, v in spec.resources.items()}
        if spec.memory:
            kw["_memory"] = n * spec.memory
        ray.init(**kw)
    ok = False
    try:
        yield ray
        ok = True
    finally:
        ray.shutdown()
        if temp_dir and ok:
            shutil.rmtree(temp_dir, ignore_errors=True)


def task_options(spec) -> dict:
    """Ray task options for one unit of work of a tool (one module, one stage)."""
    opts = dict(num_cpus=spec.cpus, num_gpus=spec.gpus)
    if spec.memory:
        opts["memory"] = spec.memory
    if spec.resources:
        opts["resources"] = dict(spec.resources)
    return opts


def concurrency(ray, spec) -> int:
    """How many tasks may run at once: --workers, else what the cluster's CPUs (GPUs) allow."""
    if spec.workers:
        return spec.workers
    res = ray.cluster_resources()
    n = int(res.get("CPU", 1) // max(spec.cpus, 1e-9))
    if spec.gpus:
        n = min(n, int(res.get("GPU", 0) // spec.gpus))
    return max(1, n)


def unwrap_ray_error(e: BaseException) -> BaseException:
    """The original exception inside a RayTaskError (UserErrors keep their one-line message)."""
    cause = getattr(e, "cause", None)
    while cause is not None and hasattr(cause, "cause") and cause is not cause.cause:
        if isinstance(cause, UserError):
            break
        cause = cause.cause
    if isinstance(cause, UserError):
        return UserError(str(cause))
    if isinstance(cause, OSError):
        return cause
    return e


def ray_wait_all(ray, refs: Iterable, on_result: Callable) -> None:
    """Wait for every ref, calling ``on_result(ref, value)`` as each finishes; unwrap task errors."""
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        for ref in ready:
            try:
                value = ray.get(ref)
            except Exception as e:
                err = unwrap_ray_error(e)
                for r in pending:
                    ray.cancel(r)
                raise err
            on_result(ref, value)
