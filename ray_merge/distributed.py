"""The Ray executor: one merge across many workers and nodes.

The driver plans from metadata only, assigns the output shards to worker actors
(largest first, within each worker's memory budget) and sends each worker shard
indices. A worker reads its own inputs (a path every node sees, or the hub cache on
its node) and writes its own shards into the staging directory, which every node must
see; only checksums and statistics come back, so no tensor data passes through the
driver. The driver journals each shard as its result arrives (``--resume`` after a
driver crash) and gives the shards of a worker that dies to the others.

Output bytes do not depend on the number of workers: the shard layout comes from the
plan, random methods are seeded per tensor name, and a tensor merged in row chunks
(over a worker's budget) gives the same bytes as merged whole.

Ray is imported lazily: importing this module (for the CLI flags) stays cheap.
"""
from __future__ import annotations

import argparse
import collections
import logging
import math
import os
import pickle
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional

from ray_merge.engine import ATTEMPTS_DIR, MergeOptions, default_memory_budget
from ray_merge.errors import UserError
from ray_merge.executor import (ShardResult, TensorLoader, check_memory, format_bytes, min_memory,
                                rows_per_chunk, write_shards)
from ray_merge.plan import Plan, PlannedTensor, Shard
from ray_merge.tools_common import check_ray_address, join_ray_cluster

log = logging.getLogger("ray_merge")

MAX_RESTARTS = 2  # Ray restarts a crashed worker actor this many times
MAX_SHARD_ATTEMPTS = 3  # a shard whose worker died this many times fails the merge
GPU_MEMORY_FRACTION = 0.9  # of a GPU's memory, the default budget of a GPU worker
TEST_DELAY_ENV = "RAY_MERGE_TEST_SHARD_DELAY"  # tests: seconds each worker sleeps before a shard


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------

@dataclass
class WorkerSpec:
    """How many merge workers, where, and with what resources."""

    workers: Optional[int] = None  # None with an address: one per node that fits a worker
    address: Optional[str] = None  # None: a local Ray instance (or the cluster of the Ray job we run in)
    memory: Optional[int] = None  # host bytes per worker (a Ray `memory` reservation and the budget)
    gpus: float = 0.0
    cpus: float = 1.0
    resources: dict = field(default_factory=dict)  # custom Ray resources each worker needs
    start_timeout: float = 300.0
    shard_delay: float = 0.0  # tests only

    @property
    def remote(self) -> bool:
        return bool(self.address) or in_ray_job()


def in_ray_job() -> bool:
    """True when running as the entrypoint of a Ray job (`ray job submit -- ray-merge run ...`)."""
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") and os.environ.get("RAY_ADDRESS"))


def add_worker_options(p: argparse.ArgumentParser) -> None:
    from ray_merge.cli import parse_size

    g = p.add_argument_group("Ray workers (merge across processes and nodes)")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="merge with N Ray worker actors; without --address a local Ray instance (127.0.0.1) "
                        "is started (inside a Ray job: that job's cluster)")
    g.add_argument("--address", default=None, metavar="ADDR",
                   help="join an existing Ray cluster: auto, HOST:PORT or ray://HOST:10001 (default workers: "
                        "one per node)")
    g.add_argument("--worker-memory", type=parse_size, default=None, metavar="SIZE",
                   help="host memory per worker, e.g. 16GiB: reserved on the node (Ray's memory resource) and, "
                        "for CPU workers, the worker's memory budget (default: a share of the node's memory)")
    g.add_argument("--worker-gpus", type=float, default=0.0, metavar="N",
                   help="GPUs per worker: the worker merges on its GPU and its memory budget is 90%% of the "
                        "GPU's memory (--memory-budget overrides)")
    g.add_argument("--worker-cpus", type=float, default=1.0, metavar="N", help="CPUs per worker (default 1)")
    g.add_argument("--worker-resource", action="append", default=[], metavar="NAME=AMOUNT",
                   help="a custom Ray resource each worker needs, e.g. merge=1 to use only nodes started "
                        "with --resources '{\"merge\": 4}' (repeatable)")
    g.add_argument("--worker-start-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="how long to wait for workers to start (autoscaling clusters: longer)")


def wants_ray(args) -> bool:
    return bool(getattr(args, "workers", None) or getattr(args, "address", None))


def spec_from_args(args) -> WorkerSpec:
    resources = {}
    for item in getattr(args, "worker_resource", []) or []:
        name, sep, amount = item.partition("=")
        try:
            resources[name.strip()] = float(amount) if sep else 1.0
        except ValueError:
            raise UserError(f"--worker-resource takes NAME=AMOUNT, got {item!r}")
    workers = getattr(args, "workers", None)
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    gpus = float(getattr(args, "worker_gpus", 0.0) or 0.0)
    device = "cuda" if getattr(args, "cuda", False) else (getattr(args, "device", None) or "cpu")
    if device.startswith("cuda") and gpus == 0:
        gpus = 1.0  # --device cuda with workers: one GPU each
    return WorkerSpec(
        workers=workers,
        address=getattr(args, "address", None),
        memory=getattr(args, "worker_memory", None),
        gpus=gpus,
        cpus=float(getattr(args, "worker_cpus", 1.0) or 1.0),
        resources=resources,
        start_timeout=float(getattr(args, "worker_start_timeout", 300.0)),
        shard_delay=float(os.environ.get(TEST_DELAY_ENV, "0") or 0),
    )


# ---------------------------------------------------------------------------------------------
# Assignment: shards to workers, largest first, within each worker's budget
# ---------------------------------------------------------------------------------------------

def tensor_peak(pt: PlannedTensor, budget: Optional[int]) -> int:
    """Memory ``pt`` takes on a worker with ``budget``: whole, or one row chunk."""
    rows = rows_per_chunk(pt, budget)
    if rows is None:
        return pt.working_bytes
    from ray_merge.executor import row_bytes

    return rows * row_bytes(pt)


def shard_cost(plan: Plan, shard: Shard) -> int:
    """Work in a shard, as bytes read plus bytes written."""
    return sum(pt.in_bytes for pt in plan.shard_tensors(shard)) + shard.nbytes


def shard_need(plan: Plan, shard: Shard) -> int:
    """The smallest budget a worker needs for this shard (tensors split into rows where allowed)."""
    return max((min_memory(pt) for pt in plan.shard_tensors(shard)), default=0)


@dataclass
class WorkerLoad:
    worker: int
    budget: Optional[int]
    shards: list = field(default_factory=list)  # shard indices, in the order the worker does them
    bytes_read: int = 0
    bytes_written: int = 0
    peak_bytes: int = 0
    chunked_tensors: int = 0

    @property
    def cost(self) -> int:
        return self.bytes_read + self.bytes_written


def assign_shards(plan: Plan, shards: list[Shard], budgets: list[Optional[int]]) -> list[WorkerLoad]:
    """Give each shard, largest first, to the least-loaded worker whose budget fits it.

    ``budgets``: one per worker (None: unlimited). Deterministic. Each worker's shards
    are then done in index order.
    """
    loads = [WorkerLoad(i, b) for i, b in enumerate(budgets)]
    for s in sorted(shards, key=lambda s: (-shard_cost(plan, s), s.index)):
        need = shard_need(plan, s)
        fits = [w for w in loads if w.budget is None or w.budget >= need]
        if not fits:
            pt = max(plan.shard_tensors(s), key=min_memory)
            biggest = max(b for b in budgets if b is not None)
            raise UserError(f"tensor {pt.name} needs {format_bytes(min_memory(pt))} to merge, more than the largest "
                            f"worker memory budget ({format_bytes(biggest)})")
        w = min(fits, key=lambda w: (w.cost, w.worker))
        w.shards.append(s.index)
        tensors = plan.shard_tensors(s)
        w.bytes_read += sum(pt.in_bytes for pt in tensors)
        w.bytes_written += s.nbytes
        w.peak_bytes = max([w.peak_bytes] + [tensor_peak(pt, w.budget) for pt in tensors])
        w.chunked_tensors += sum(1 for pt in tensors if rows_per_chunk(pt, w.budget) is not None)
    for w in loads:
        w.shards.sort()
    return loads


def format_assignment(plan: Plan, loads: list[WorkerLoad], shards: Optional[list[Shard]] = None) -> str:
    shards = plan.shards if shards is None else shards
    lines = [f"workers:       {len(loads)}"]
    for w in loads:
        budget = format_bytes(w.budget) if w.budget is not None else "GPU memory"
        lines.append(
            f"  worker {w.worker}: {len(w.shards)} shard(s), writes {format_bytes(w.bytes_written)}, "
            f"reads {format_bytes(w.bytes_read)}, peak memory {format_bytes(w.peak_bytes)} "
            f"(budget {budget})" + (f", {w.chunked_tensors} tensor(s) in row chunks" if w.chunked_tensors else "")
        )
        if w.shards:
            lines.append(f"    shards {_ranges(w.shards)}")
    plan_bytes = len(pickle.dumps(plan))
    lines.append(f"through the driver: the plan ({format_bytes(plan_bytes)} to each worker) and checksums; "
                 f"no tensor data")
    return "\n".join(lines)


def _ranges(indices: list[int]) -> str:
    """[0,1,2,5,7,8] -> '0-2, 5, 7-8' (shard indices)."""
    out, start, prev = [], None, None
    for i in sorted(indices):
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = i
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ", ".join(out)


def planned_budgets(spec: WorkerSpec, options: MergeOptions, n: int) -> list[Optional[int]]:
    """Budgets known without a cluster: explicit ones, or this machine's memory shared by local workers."""
    if options.memory_budget:
        return [options.memory_budget] * n
    if spec.gpus:
        return [None] * n  # the GPU's memory, known when the workers start
    if spec.memory:
        return [spec.memory] * n
    return [None if spec.remote else default_memory_budget() // n] * n


# ---------------------------------------------------------------------------------------------
# The worker actor
# ---------------------------------------------------------------------------------------------

class _ReleasingLoader(TensorLoader):
    """Drops its memory maps after each read, so mapped input pages never outlive their tensors."""

    def load_all(self, pt):
        try:
            return super().load_all(pt)
        finally:
            self.release()

    def load_rows(self, inp, start, stop):
        try:
            return super().load_rows(inp, start, stop)
        finally:
            self.release()

    def release(self) -> None:
        for r in self._readers.values():
            r.close()


def _status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak resident memory of this process over a span: the kernel's high-water mark, reset at
    the start (Linux /proc/self/clear_refs), or else sampled every few milliseconds."""

    def __init__(self):
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._peak = 0
        self._hwm = False

    @staticmethod
    def rss() -> int:
        import psutil

        return psutil.Process().memory_info().rss

    def start(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self._hwm = _status_kib("VmHWM") is not None
        except OSError:
            self._hwm = False
        if not self._hwm:
            self._peak = self.rss()
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, self.rss())

    def stop(self) -> int:
        if self._hwm:
            return max(_status_kib("VmHWM") or 0, self.rss())
        self._stop.set()
        if self._thread:
            self._thread.join()
        return max(self._peak, self.rss())


class MergeWorker:
    """One merge worker (a Ray actor): writes the shards the driver sends it."""

    def __init__(self, plan: Plan, stage: str, rank: int, device: str, budget: Optional[int],
                 threads: int = 1, shard_delay: float = 0.0):
        import ray
        import torch

        import ray_merge.methods  # noqa: F401  (register every method before the baseline)

        torch.set_num_threads(max(1, threads))
        self.rank = rank
        self.stage = stage
        self.device = device
        self.shard_delay = shard_delay
        self.problems: list[str] = []
        self.node_id = ray.get_runtime_context().get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.plan = self._localize(plan)
        self.shards = {s.index: s for s in self.plan.shards}
        if not os.path.isdir(stage):
            self.problems.append(f"cannot see the output staging directory {stage}: the output must be on a "
                                 f"filesystem every node shares")
        self.gpu_total = 0
        if device.startswith("cuda"):
            if torch.cuda.is_available():
                self.gpu_total = torch.cuda.get_device_properties(0).total_memory
            else:
                self.problems.append("was given a GPU by Ray but torch sees no CUDA device")
        self.budget = budget if budget is not None else (int(self.gpu_total * GPU_MEMORY_FRACTION) or None)
        # warm up (allocator, thread pools), then take the baseline every peak is measured against
        x = torch.ones(1 << 16)
        float(x.sum())
        del x
        self.baseline_rss = PeakMemory.rss()
        self.peak_rss = self.baseline_rss

    def _localize(self, plan: Plan) -> Plan:
        """Input paths as this node sees them: hub models come from this node's hub cache."""
        import copy

        from ray_merge.io.models import resolve_model_dir
        from ray_merge.plan import InputModel
        from ray_merge.recipe import ModelRef

        models = []
        changed = False
        for m in plan.models:
            if os.path.isdir(m.path):
                models.append(m)
                continue
            ref = ModelRef.parse(m.ref)
            parts = m.path.rstrip("/").split("/")
            if len(parts) > 2 and parts[-2] == "snapshots":
                ref = ModelRef(ref.path, parts[-1])  # the exact commit the driver planned with
            try:
                models.append(InputModel(m.ref, resolve_model_dir(ref)))
                changed = True
            except UserError as e:
                self.problems.append(f"cannot read input model {m.ref} ({m.path}): {e}")
                models.append(m)
        if not changed:
            return plan
        local = copy.copy(plan)
        local.models = models
        return local

    def info(self) -> dict:
        import socket

        return {"worker": self.rank, "node_id": self.node_id, "node_ip": self.node_ip,
                "hostname": socket.gethostname(), "pid": os.getpid(), "device": self.device,
                "budget": self.budget, "gpu_total": self.gpu_total, "baseline_rss": self.baseline_rss,
                "problems": self.problems}

    def ping(self) -> bool:
        return True

    def run_shard(self, index: int) -> dict:
        import torch

        t0 = time.time()
        shard = self.shards[index]
        if self.shard_delay:
            time.sleep(self.shard_delay)
        attempt = os.path.join(self.stage, ATTEMPTS_DIR, f"{index:05d}-{uuid.uuid4().hex[:8]}")
        os.makedirs(attempt)
        mem = PeakMemory()
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        mem.start()
        try:
            res = write_shards(self.plan, [shard], attempt, loader=_ReleasingLoader(self.plan),
                               device=self.device, memory_budget=self.budget)[0]
            # a whole file or nothing: a worker killed mid-write leaves only its attempt directory
            os.replace(os.path.join(attempt, shard.filename), os.path.join(self.stage, shard.filename))
        finally:
            shutil.rmtree(attempt, ignore_errors=True)
        peak = mem.stop()
        self.peak_rss = max(self.peak_rss, peak)
        tensors = self.plan.shard_tensors(shard)
        return {
            "index": res.index, "filename": shard.filename, "checksum": res.checksum, "nbytes": res.nbytes,
            "worker": self.rank, "node_id": self.node_id, "node_ip": self.node_ip, "pid": os.getpid(),
            "wall_s": time.time() - t0, "bytes_read": sum(pt.in_bytes for pt in tensors),
            "peak_rss": peak, "baseline_rss": self.baseline_rss,
            "peak_gpu": torch.cuda.max_memory_allocated() if cuda else 0,
            "chunked_tensors": sum(1 for pt in tensors if rows_per_chunk(pt, self.budget) is not None),
        }


# ---------------------------------------------------------------------------------------------
# The executor (driver side)
# ---------------------------------------------------------------------------------------------

@dataclass
class _Slot:
    """A worker as the driver sees it."""

    rank: int
    actor: object
    info: dict = field(default_factory=dict)
    state: str = "starting"  # starting, idle, busy, probing (after a failure), dead
    budget: Optional[int] = None
    queue: collections.deque = field(default_factory=collections.deque)
    failures: int = 0
    stats: dict = field(default_factory=dict)


class RayExecutor:
    """run_merge's executor on Ray: ``run_merge(recipe, out, options, executor=RayExecutor(spec))``.

    After a run: ``stats`` (per worker), ``shard_nodes`` (shard index -> node id),
    ``retries`` and ``manifest_extra()`` (what goes into the manifest).
    ``after_result`` (tests) is called as ``after_result(self, result_dict)`` on the driver.
    """

    def __init__(self, spec: WorkerSpec, *, verbose: int = 0,
                 after_result: Optional[Callable[["RayExecutor", dict], None]] = None):
        self.spec = spec
        self.verbose = verbose
        self.after_result = after_result
        self.slots: list[_Slot] = []
        self.shard_nodes: dict[int, str] = {}
        self.shard_workers: dict[int, int] = {}
        self.retries: list[dict] = []
        self.driver_bytes_received = 0
        self.plan_bytes = 0
        self.address = None
        self.wall_s = 0.0
        self.inflight: dict = {}  # ObjectRef -> (slot, shard index)
        self._owns_ray = False
        self._connected_here = False
        self._temp_dir: Optional[str] = None

    # -- run_merge hooks ----------------------------------------------------------------------
    def preflight(self, plan: Plan, options: MergeOptions) -> None:
        """Before any output is written: the cluster answers, and every tensor fits a worker's
        budget (where known now)."""
        if self.spec.remote:
            check_ray_address(self.spec.address)
        n = self.spec.workers or 1
        if self.spec.gpus and not self.spec.remote:  # a local instance: this machine's GPUs
            import torch

            if torch.cuda.device_count() < n * self.spec.gpus:
                raise UserError(f"{n} worker(s) with --worker-gpus {self.spec.gpus:g} need {n * self.spec.gpus:g} "
                                f"GPU(s); this machine has {torch.cuda.device_count()}")
        budgets = [b for b in planned_budgets(self.spec, options, n) if b is not None]
        if budgets:
            check_memory(plan, plan.shards, max(budgets))

    def manifest_extra(self) -> dict:
        return {
            "executor": {
                "kind": "ray", "address": self.address, "workers": len(self.slots),
                "wall_s": round(self.wall_s, 3),
                "driver_bytes_received": self.driver_bytes_received, "plan_bytes_sent": self.plan_bytes,
                "retries": self.retries,
            },
            "workers": self.stats,
        }

    @property
    def stats(self) -> list[dict]:
        return [s.stats for s in self.slots]

    def __call__(self, plan: Plan, shards: list[Shard], stage: str, options: MergeOptions, on_shard,
                 progress=None) -> list[ShardResult]:
        if not shards:
            return []
        t0 = time.time()
        ok = False
        try:
            self._connect(options)
            results = self._run(plan, shards, stage, options, on_shard, progress)
            ok = True
            return results
        except (UserError, KeyboardInterrupt):
            ok = True  # nothing in Ray's logs that the message doesn't say
            raise
        finally:
            self.wall_s = time.time() - t0
            self._teardown(ok)

    # -- Ray ------------------------------------------------------------------------------------
    def _connect(self, options: MergeOptions) -> None:
        if not self.spec.remote and "ray" not in sys.modules:
            # A local instance: advertise 127.0.0.1 (Ray's loopback mode, read when ray is imported) and use
            # token authentication (Ray's default for a new local instance; set here, it comes without a warning).
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            os.environ.setdefault("RAY_AUTH_MODE", "token")
        import ray

        quiet = dict(logging_level=logging.INFO if self.verbose >= 2 else logging.WARNING,
                     log_to_driver=self.verbose >= 1)
        if ray.is_initialized():
            self.address = "(already connected)"
            return
        if self.spec.remote:
            address = self.spec.address or "auto"
            join_ray_cluster(address, **quiet)
            self._connected_here = True
            self.address = address
            return
        # A local Ray instance (advertised on 127.0.0.1, token-authenticated) with room for every worker.
        n = self.spec.workers or 1
        base = os.environ.get("RAY_TMPDIR") or "/tmp"  # short: Ray's socket paths are limited to ~107 chars
        self._temp_dir = tempfile.mkdtemp(prefix="rm-", dir=base)
        kw = dict(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(n * self.spec.cpus)),
                  _node_ip_address="127.0.0.1", include_dashboard=False, _temp_dir=self._temp_dir,
                  object_store_memory=128 * 2**20, **quiet)
        if self.spec.resources:
            kw["resources"] = {k: v * n for k, v in self.spec.resources.items()}
        if self.spec.memory:
            kw["_memory"] = n * self.spec.memory
        ray.init(**kw)
        self._owns_ray = True
        self._connected_here = True
        self.address = "local"

    def _teardown(self, ok: bool) -> None:
        import ray

        for s in self.slots:
            try:
                ray.kill(s.actor)
            except Exception:
                pass
        if self._connected_here:
            ray.shutdown()
        if self._temp_dir:
            if ok:
                shutil.rmtree(self._temp_dir, ignore_errors=True)
            else:
                log.warning("Ray logs of this run are in %s", self._temp_dir)

    def _default_budget(self, options: MergeOptions, n: int) -> Optional[int]:
        if options.memory_budget:
            return options.memory_budget
        if self.spec.gpus:
            return None  # each worker: its GPU's memory (--worker-memory only reserves host memory)
        if self.spec.memory:
            return self.spec.memory
        if self._owns_ray:
            return default_memory_budget() // n
        import ray

        nodes = [nd for nd in ray.nodes() if nd.get("Alive") and self._fits(nd.get("Resources", {}))]
        if not nodes:
            return None
        per_node = math.ceil(n / len(nodes))
        return int(min(nd["Resources"].get("memory", 0) for nd in nodes) * 0.8 / per_node) or None

    def _fits(self, resources: dict) -> bool:
        need = {"CPU": self.spec.cpus, "GPU": self.spec.gpus, **self.spec.resources}
        if self.spec.memory:
            need["memory"] = self.spec.memory
        return all(resources.get(k, 0) >= v for k, v in need.items() if v)

    def _count_workers(self) -> int:
        if self.spec.workers:
            return self.spec.workers
        import ray

        n = sum(1 for nd in ray.nodes() if nd.get("Alive") and self._fits(nd.get("Resources", {})))
        if n == 0:
            raise UserError(f"no node of the Ray cluster at {self.address} fits a merge worker "
                            f"({self._describe_need()}); pass --workers N to wait for nodes to join")
        return n

    def _describe_need(self) -> str:
        parts = [f"{self.spec.cpus:g} CPU"]
        if self.spec.gpus:
            parts.append(f"{self.spec.gpus:g} GPU")
        if self.spec.memory:
            parts.append(f"{format_bytes(self.spec.memory)} memory")
        parts += [f"{v:g} {k}" for k, v in self.spec.resources.items()]
        return ", ".join(parts)

    def _start_workers(self, plan: Plan, stage: str, options: MergeOptions) -> None:
        import ray

        n = self._count_workers()
        budget = self._default_budget(options, n)
        device = "cuda" if self.spec.gpus else "cpu"
        opts = dict(num_cpus=self.spec.cpus, num_gpus=self.spec.gpus, scheduling_strategy="SPREAD",
                    max_restarts=MAX_RESTARTS, max_task_retries=0)
        if self.spec.resources:
            opts["resources"] = dict(self.spec.resources)
        if self.spec.memory:
            opts["memory"] = self.spec.memory
        if self._owns_ray:
            have = ray.cluster_resources()
            for k, v in (("GPU", self.spec.gpus), *self.spec.resources.items()):
                if v and have.get(k, 0) < n * v:
                    raise UserError(f"{n} worker(s) need {n * v:g} {k} in all; this machine has {have.get(k, 0):g}")
        elif not any(self._fits(nd.get("Resources", {})) for nd in ray.nodes() if nd.get("Alive")):
            log.warning("no node of the cluster fits a merge worker (%s) yet; waiting up to %.0fs for the "
                        "autoscaler", self._describe_need(), self.spec.start_timeout)
        remote_cls = ray.remote(MergeWorker)
        self.plan_bytes = len(pickle.dumps(plan))
        threads = max(1, int(self.spec.cpus))
        self.slots = [_Slot(rank, remote_cls.options(**opts).remote(plan, stage, rank, device, budget, threads,
                                                                     self.spec.shard_delay))
                      for rank in range(n)]
        pending = {s.actor.info.remote(): s for s in self.slots}
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=self.spec.start_timeout)
        problems = []
        for ref in ready:
            slot = pending[ref]
            try:
                slot.info = ray.get(ref)
            except ray.exceptions.RayError as e:
                problems.append(f"worker {slot.rank} failed to start: {_one_line(e)}")
                slot.state = "dead"
                continue
            for p in slot.info["problems"]:
                problems.append(f"worker {slot.rank} on node {slot.info['node_ip']}: {p}")
            slot.state = "idle"
            slot.budget = slot.info["budget"]
        if problems:
            raise UserError("; ".join(problems))
        late = [s for s in self.slots if s.state == "starting"]
        for s in late:
            ray.kill(s.actor)
            s.state = "dead"
        live = [s for s in self.slots if s.state == "idle"]
        if not live:
            raise UserError(f"no merge worker started within {self.spec.start_timeout:.0f}s; each needs "
                            f"{self._describe_need()} and the cluster has "
                            f"{ {k: v for k, v in ray.cluster_resources().items() if not k.startswith('node:')} }")
        if late:
            log.warning("%d of %d workers did not start within %.0fs; merging with %d", len(late), n,
                        self.spec.start_timeout, len(live))
        for s in self.slots:
            s.stats = {"worker": s.rank, "node_id": s.info.get("node_id"), "node_ip": s.info.get("node_ip"),
                       "hostname": s.info.get("hostname"), "pid": s.info.get("pid"), "device": device,
                       "budget_bytes": s.budget, "started": s.state != "dead", "shards": [], "node_ids": [],
                       "bytes_read": 0, "bytes_written": 0, "busy_s": 0.0,
                       "baseline_rss_bytes": s.info.get("baseline_rss", 0), "peak_rss_bytes": 0,
                       "peak_rss_over_baseline_bytes": 0, "peak_gpu_bytes": 0, "chunked_tensors": 0,
                       "failures": 0}

    def _run(self, plan: Plan, shards: list[Shard], stage: str, options: MergeOptions, on_shard,
             progress) -> list[ShardResult]:
        import ray

        os.makedirs(os.path.join(stage, ATTEMPTS_DIR), exist_ok=True)
        self.inflight = {}
        self._start_workers(plan, stage, options)
        live = [s for s in self.slots if s.state == "idle"]
        budgets = [s.budget for s in live]
        known = [b for b in budgets if b is not None]
        if known:
            check_memory(plan, shards, max(known))
        by_index = {s.index: s for s in shards}
        for load, slot in zip(assign_shards(plan, shards, budgets), live):
            slot.queue.extend(load.shards)
        log.info("assignment: %s", "; ".join(f"worker {s.rank}: {len(s.queue)} shards" for s in live))
        need = {s.index: shard_need(plan, s) for s in shards}
        orphans: collections.deque = collections.deque()  # shards whose worker died
        attempts: collections.Counter = collections.Counter()
        done: dict[int, ShardResult] = {}

        def fits(slot: _Slot, idx: int) -> bool:
            return slot.budget is None or slot.budget >= need[idx]

        def next_shard(slot: _Slot) -> Optional[int]:
            for i, idx in enumerate(orphans):
                if fits(slot, idx):
                    del orphans[i]
                    return idx
            if slot.queue:
                return slot.queue.popleft()
            # steal from the end of the longest queue
            others = sorted((o for o in self.slots if o is not slot and o.queue),
                            key=lambda o: -sum(shard_cost(plan, by_index[i]) for i in o.queue))
            for o in others:
                for j in range(len(o.queue) - 1, -1, -1):
                    if fits(slot, o.queue[j]):
                        idx = o.queue[j]
                        del o.queue[j]
                        return idx
            return None

        probes: dict = {}  # ObjectRef of a ping -> slot
        while len(done) < len(shards):
            for slot in self.slots:
                if slot.state == "idle":
                    idx = next_shard(slot)
                    if idx is not None:
                        self.inflight[slot.actor.run_shard.remote(idx)] = (slot, idx)
                        slot.state = "busy"
            if not self.inflight and not probes:
                left = sorted(set(by_index) - set(done))
                if not any(s.state != "dead" for s in self.slots):
                    raise RuntimeError(f"every merge worker died; {len(left)} shard(s) left undone "
                                       f"(rerun with --resume to finish)")
                raise UserError(f"no live worker has the memory budget for shard(s) {_ranges(left)}")
            ready, _ = ray.wait(list(self.inflight) + list(probes), num_returns=1, timeout=1.0)
            for ref in ready:
                if ref in probes:
                    slot = probes.pop(ref)
                    try:
                        ray.get(ref)
                        slot.state = "idle"  # restarted by Ray
                    except ray.exceptions.RayError:
                        self._retire(slot, orphans)
                    continue
                slot, idx = self.inflight.pop(ref)
                try:
                    out = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                        ray.exceptions.OutOfMemoryError, ray.exceptions.WorkerCrashedError) as e:
                    attempts[idx] += 1
                    slot.failures += 1
                    slot.stats["failures"] = slot.failures
                    self.retries.append({"shard": idx, "worker": slot.rank, "error": type(e).__name__})
                    log.warning("worker %d died during shard %d (%s); redoing it elsewhere", slot.rank, idx,
                                type(e).__name__)
                    if attempts[idx] >= MAX_SHARD_ATTEMPTS:
                        raise RuntimeError(f"shard {by_index[idx].filename} failed {attempts[idx]} times, its "
                                           f"worker died each time (last: {_one_line(e)}); rerun with --resume")
                    if idx not in done:
                        orphans.appendleft(idx)
                    if slot.failures > MAX_RESTARTS:
                        self._retire(slot, orphans)
                    else:
                        slot.state = "probing"  # Ray restarts it; a ping tells when (or that it is gone)
                        probes[slot.actor.ping.remote()] = slot
                    continue
                except ray.exceptions.RayTaskError as e:
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, (UserError, OSError)):
                        raise cause
                    raise RuntimeError(f"shard {by_index[idx].filename} failed on worker {slot.rank}: "
                                       f"{_one_line(e)}") from None
                slot.state = "idle"
                self.driver_bytes_received += len(pickle.dumps(out))
                if idx in done:
                    continue  # a duplicate (a retried shard that finished twice): same bytes
                res = ShardResult(idx, out["filename"], out["checksum"], out["nbytes"], list(by_index[idx].tensors))
                done[idx] = res
                on_shard(res)  # journaled here, as each result arrives
                self._record(slot, out)
                if progress is not None:
                    progress.update(by_index[idx].nbytes)
                if self.after_result:
                    self.after_result(self, out)
        return [done[s.index] for s in shards]

    def _retire(self, slot: _Slot, orphans: collections.deque) -> None:
        slot.state = "dead"
        orphans.extend(slot.queue)
        slot.queue.clear()
        log.warning("worker %d is gone; its shards go to the others", slot.rank)

    def _record(self, slot: _Slot, out: dict) -> None:
        st = slot.stats
        self.shard_nodes[out["index"]] = out["node_id"]
        self.shard_workers[out["index"]] = slot.rank
        st["shards"].append(out["index"])
        if out["node_id"] not in st["node_ids"]:
            st["node_ids"].append(out["node_id"])
        st["node_id"], st["node_ip"], st["pid"] = out["node_id"], out["node_ip"], out["pid"]
        st["bytes_read"] += out["bytes_read"]
        st["bytes_written"] += out["nbytes"]
        st["busy_s"] = round(st["busy_s"] + out["wall_s"], 4)
        st["baseline_rss_bytes"] = out["baseline_rss"]
        st["peak_rss_bytes"] = max(st["peak_rss_bytes"], out["peak_rss"])
        st["peak_rss_over_baseline_bytes"] = max(st["peak_rss_over_baseline_bytes"],
                                                 out["peak_rss"] - out["baseline_rss"])
        st["peak_gpu_bytes"] = max(st["peak_gpu_bytes"], out["peak_gpu"])
        st["chunked_tensors"] += out["chunked_tensors"]

    def format_stats(self) -> str:
        lines = [f"ray executor: {len(self.slots)} worker(s) at {self.address}, {self.wall_s:.1f}s, "
                 f"{format_bytes(self.driver_bytes_received)} of results through the driver, "
                 f"{len(self.retries)} retried shard(s)"]
        for st in self.stats:
            lines.append(
                f"  worker {st['worker']} ({st['node_ip']}, {(st['node_id'] or '?')[:8]}): "
                f"{len(st['shards'])} shard(s), busy {st['busy_s']:.1f}s, read {format_bytes(st['bytes_read'])}, "
                f"wrote {format_bytes(st['bytes_written'])}, peak RSS {format_bytes(st['peak_rss_bytes'])} "
                f"(+{format_bytes(st['peak_rss_over_baseline_bytes'])} over baseline, budget "
                f"{format_bytes(st['budget_bytes']) if st['budget_bytes'] else '-'})"
                + (f", {st['failures']} failure(s)" if st["failures"] else "")
            )
        return "\n".join(lines)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:500]


def executor_from_args(args) -> RayExecutor:
    return RayExecutor(spec_from_args(args), verbose=getattr(args, "verbose", 0))


def plan_assignment(plan: Plan, args, options: MergeOptions) -> str:
    """`ray-merge plan --workers N`: the assignment the driver would make."""
    spec = spec_from_args(args)
    if not spec.workers:
        return "workers:       one per node of the cluster (pass --workers N to see an assignment)"
    budgets = planned_budgets(spec, options, spec.workers)
    if budgets[0] is not None:
        check_memory(plan, plan.shards, budgets[0])
    return format_assignment(plan, assign_shards(plan, plan.shards, budgets))


__all__ = ["RayExecutor", "WorkerSpec", "MergeWorker", "assign_shards", "format_assignment", "add_worker_options",
           "spec_from_args", "executor_from_args", "plan_assignment", "wants_ray", "in_ray_job"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `ray-merge run --workers N`")
