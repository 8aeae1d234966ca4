"""Connecting to Ray: a local instance we start (and stop), the cluster at an address, or the cluster of
the Ray job we run in; plus small helpers for Ray tasks (resources, errors).
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from contextlib import contextmanager
from typing import Callable, Iterable, Optional

from ray_merge.errors import UserError

log = logging.getLogger("ray_merge")


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


# Signals that stop a run the way Ctrl-C does while this process runs a local Ray instance: raised as
# Interrupted in the main thread, so the instance is shut down and its temp dir removed on the way out
# (left to their defaults, SIGTERM kept the temp dir and SIGHUP left Ray's agents running for a minute).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A stop signal received while a local Ray instance ran; ``exit_code`` is the shell's 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


class RayConnection:
    """Ray for one run, by the one rule every command follows: join the cluster at ``spec.address`` (or, inside
    a Ray job, that job's cluster), or start a local instance on 127.0.0.1 with room for ``spec.workers``
    workers. A connection that is already up (a test's cluster, a caller's session) is used as it is and
    left up; :meth:`close` shuts down only what :meth:`open` started.

    After :meth:`open`: ``address`` ("local", the cluster's address, or "(already connected)") and
    ``local`` (True when this connection started the local instance).

    While a local instance runs, SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` in the main thread
    (the caller's ``finally`` then calls :meth:`close`); :meth:`close` puts the previous handlers back.
    """

    def __init__(self, spec, verbose: int = 0, object_store_bytes: int = 256 * 2**20):
        self.spec = spec
        self.verbose = verbose
        self.object_store_bytes = object_store_bytes
        self.address: Optional[str] = None
        self.local = False
        self.connected_here = False
        self.temp_dir: Optional[str] = None
        self._saved_handlers: dict = {}
        self._stop_signal: Optional[int] = None  # the stop signal received, if any
        self._closing = False
        self._signal_in_close = False

    def open(self):
        """Connect (or start Ray); returns the ``ray`` module."""
        if not self.spec.remote and "ray" not in sys.modules:
            # A local instance: advertise 127.0.0.1 (Ray's loopback mode, read when ray is imported) and use
            # token authentication (Ray's default for a new local instance; set here, it comes without a warning).
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            os.environ.setdefault("RAY_AUTH_MODE", "token")
        import ray

        if ray.is_initialized():
            self.address = "(already connected)"
            return ray
        quiet = dict(logging_level=logging.INFO if self.verbose >= 2 else logging.WARNING,
                     log_to_driver=self.verbose >= 1)
        if self.spec.remote:
            address = self.spec.address or "auto"
            join_ray_cluster(address, **quiet)
            self.connected_here = True
            self.address = address
            return ray
        n = self.spec.workers or 1
        base = os.environ.get("RAY_TMPDIR") or "/tmp"  # short: Ray's socket paths are limited to ~107 chars
        self.temp_dir = tempfile.mkdtemp(prefix="rm-", dir=base)
        kw = dict(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(n * self.spec.cpus)),
                  _node_ip_address="127.0.0.1", include_dashboard=False, _temp_dir=self.temp_dir,
                  object_store_memory=self.object_store_bytes, **quiet)
        if self.spec.resources:
            kw["resources"] = {k: v * n for k, v in self.spec.resources.items()}
        if self.spec.memory:
            kw["_memory"] = n * self.spec.memory
        self.connected_here = True  # before ray.init: an interrupted start is shut down too
        self.local = True
        self.address = "local"
        ray.init(**kw)
        self._catch_signals()
        return ray

    def _catch_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python runs signal handlers in the main thread only
        for sig in STOP_SIGNALS:
            self._saved_handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        if self._stop_signal is not None:
            return  # stopping already: a second signal does not cut the shutdown short
        self._stop_signal = signum
        if self._closing:
            self._signal_in_close = True  # raised once the shutdown is done
            return
        raise Interrupted(signum)

    def close(self, ok: bool = True, *, name_logs: bool = True) -> Optional[str]:
        """Disconnect (a local instance stops, its temp dir removed). Unless the run went ``ok`` its logs
        are kept: returns their directory, also logged when ``name_logs``."""
        import ray

        self._closing = True
        try:
            if self.connected_here:
                ray.shutdown()
                self.connected_here = False
        finally:
            for sig, handler in self._saved_handlers.items():
                signal.signal(sig, handler)
            self._saved_handlers = {}
        kept = None
        if self.temp_dir:
            if ok:
                shutil.rmtree(self.temp_dir, ignore_errors=True)
            else:
                kept = self.temp_dir
                if name_logs:
                    log.warning("Ray logs of this run are in %s", kept)
            self.temp_dir = None
        self._closing = False
        if self._signal_in_close:
            raise Interrupted(self._stop_signal)
        return kept


@contextmanager
def ray_session(spec, verbose: int = 0, object_store_bytes: int = 256 * 2**20):
    """A :class:`RayConnection` for the length of a ``with`` block; yields the ``ray`` module. A UserError
    or an interrupt counts as a clean end (Ray's logs would say nothing more)."""
    conn = RayConnection(spec, verbose, object_store_bytes)
    ok = False
    try:
        yield conn.open()
        ok = True
    except (UserError, KeyboardInterrupt):
        ok = True
        raise
    finally:
        conn.close(ok)


def worker_runtime_env() -> dict:
    """The runtime environment of every actor and task: OpenMP threads that sleep while they wait.

    Local workers inherit it from this process (``parallel.set_thread_defaults``); a cluster's workers are
    started by their node's raylet, so it is passed here. Spinning threads starve each other on shared cores.
    """
    return {"env_vars": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}}


def task_options(spec) -> dict:
    """Ray task options for one unit of work of a tool (one module, one stage)."""
    opts = dict(num_cpus=spec.cpus, num_gpus=spec.gpus, runtime_env=worker_runtime_env())
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
