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

import collections
import logging
import math
import os
import pickle
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from ray_merge.errors import UserError, one_line
from ray_merge.execute.ray.actor import MAX_RESTARTS, MergeWorker
from ray_merge.execute.ray.session import check_ray_address, join_ray_cluster
from ray_merge.execute.shards import ShardResult
from ray_merge.options import MergeOptions, WorkerSpec
from ray_merge.output.staging import ATTEMPTS_DIR
from ray_merge.planner.memory import (
    check_memory,
    default_memory_budget,
    planned_budgets,
)
from ray_merge.planner.plan import Plan, Shard
from ray_merge.planner.shards import _ranges, assign_shards, shard_cost, shard_need
from ray_merge.units import format_bytes

log = logging.getLogger("ray_merge")


MAX_SHARD_ATTEMPTS = 3  # a shard whose worker died this many times fails the merge


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
                problems.append(f"worker {slot.rank} failed to start: {one_line(e)}")
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
                                           f"worker died each time (last: {one_line(e)}); rerun with --resume")
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
                                       f"{one_line(e)}") from None
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

