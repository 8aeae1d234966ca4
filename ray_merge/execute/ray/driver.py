"""The Ray executor: one merge across many workers and nodes.

The driver plans from metadata only, assigns the output shards to worker actors
(largest first, within each worker's memory budget) and sends each worker shard
indices. A worker reads its own inputs (a path every node sees, or the hub cache on
its node, each weight file fetched by the worker that reads it) and writes its own shards
into the staging directory, which every node must see, or straight to object storage (an
output URL, with the storage options passed to every worker); only checksums and
statistics come back, so no tensor data passes through the driver. The driver journals
each shard as its result arrives (``--resume`` after a driver crash) and gives the shards
of a worker that dies to the others.

Output bytes do not depend on the number of workers: the shard layout comes from the
plan, random methods are seeded per tensor name, and a tensor merged in row chunks
(over a worker's budget) gives the same bytes as merged whole.

Ray is imported lazily: importing this module (for the CLI flags) stays cheap.
"""
from __future__ import annotations

import logging
import math
import os
import pickle
import time
from dataclasses import dataclass, field
from typing import Optional

from ray_merge.errors import UserError, one_line
from ray_merge.execute.ray.actor import MAX_RESTARTS, MergeWorker
from ray_merge.execute.ray.pool import WorkPool
from ray_merge.execute.ray.session import RayConnection, check_ray_address, worker_runtime_env
from ray_merge.execute.shards import ATTEMPTS_DIR, ShardResult
from ray_merge.io.storage import is_url, parse_storage_options
from ray_merge.options import MergeOptions, WorkerSpec
from ray_merge.planner.memory import (
    check_memory,
    default_memory_budget,
    node_worker_budget,
    planned_budgets,
)
from ray_merge.planner.plan import Plan, Shard
from ray_merge.planner.shards import ShardQueue, _ranges
from ray_merge.units import format_bytes

log = logging.getLogger("ray_merge")


MAX_SHARD_ATTEMPTS = 3  # a shard whose worker died this many times fails the merge


class WorkersLost(UserError):
    """The merge cannot go on: its workers died (and Ray could not bring them back), or a shard's worker
    died too often. One line, like a UserError; the journal keeps the finished shards for ``--resume``."""


@dataclass
class _Slot:
    """A worker as the driver sees it (``rank``: its index in ``RayExecutor.slots`` and in the pool)."""

    rank: int
    actor: object
    info: dict = field(default_factory=dict)
    state: str = "starting"  # starting, started, dead (did not start)
    budget: Optional[int] = None
    failures: int = 0
    stats: dict = field(default_factory=dict)


class RayExecutor:
    """run_merge's executor on Ray: ``run_merge(recipe, out, options, executor=RayExecutor(spec))``.

    After a run: ``stats`` (per worker), ``shard_nodes`` (shard index -> node id),
    ``retries`` and ``manifest_extra()`` (what goes into the manifest).
    ``worker_cls``: the actor class (a subclass of :class:`MergeWorker`).
    """

    def __init__(self, spec: WorkerSpec, *, verbose: int = 0, worker_cls: type = MergeWorker):
        self.spec = spec
        self.verbose = verbose
        self.worker_cls = worker_cls
        self.slots: list[_Slot] = []
        self.pool: Optional[WorkPool] = None
        self.shard_nodes: dict[int, str] = {}
        self.shard_workers: dict[int, int] = {}
        self.retries: list[dict] = []
        self.driver_bytes_received = 0
        self.plan_bytes = 0
        self.address = None
        self.wall_s = 0.0
        self._ray: Optional[RayConnection] = None

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
        ok, name_logs = False, True
        try:
            self._connect()
            results = self._run(plan, shards, stage, options, on_shard, progress)
            ok = True
            return results
        except WorkersLost:
            name_logs = False  # kept: the message names them
            raise
        except (UserError, KeyboardInterrupt):
            ok = True  # nothing in Ray's logs that the message doesn't say
            raise
        finally:
            self.wall_s = time.time() - t0
            self._teardown(ok, name_logs)

    # -- Ray ------------------------------------------------------------------------------------
    def _connect(self) -> None:
        self._ray = RayConnection(self.spec, self.verbose, object_store_bytes=128 * 2**20)
        self._ray.open()
        self.address = self._ray.address

    def _teardown(self, ok: bool, name_logs: bool = True) -> None:
        import ray

        for s in self.slots:
            try:
                ray.kill(s.actor)
            except Exception:
                pass
        if self._ray is not None:
            self._ray.close(ok, name_logs=name_logs)

    def _lost(self, what: str) -> WorkersLost:
        """The one-line error of a merge its workers could not finish."""
        logs = f"; Ray's logs are in {self._ray.temp_dir}" if self._ray is not None and self._ray.temp_dir else ""
        return WorkersLost(f"{what}; rerun with --resume to finish the merge{logs}")

    def _default_budget(self, options: MergeOptions, n: int) -> Optional[int]:
        if options.memory_budget:
            return options.memory_budget
        if self.spec.gpus:
            return None  # each worker: its GPU's memory (--worker-memory only reserves host memory)
        if self.spec.memory:
            return self.spec.memory
        if self._ray.local:
            return default_memory_budget(n)
        import ray

        nodes = [nd for nd in ray.nodes() if nd.get("Alive") and self._fits(nd.get("Resources", {}))]
        if not nodes:
            return None
        per_node = math.ceil(n / len(nodes))
        return node_worker_budget(min(nd["Resources"].get("memory", 0) for nd in nodes), per_node)

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
                    runtime_env=worker_runtime_env(),
                    max_restarts=MAX_RESTARTS, max_task_retries=0)
        if self.spec.resources:
            opts["resources"] = dict(self.spec.resources)
        if self.spec.memory:
            opts["memory"] = self.spec.memory
        if self._ray.local:
            have = ray.cluster_resources()
            for k, v in (("GPU", self.spec.gpus), *self.spec.resources.items()):
                if v and have.get(k, 0) < n * v:
                    raise UserError(f"{n} worker(s) need {n * v:g} {k} in all; this machine has {have.get(k, 0):g}")
        elif not any(self._fits(nd.get("Resources", {})) for nd in ray.nodes() if nd.get("Alive")):
            log.warning("no node of the cluster fits a merge worker (%s) yet; waiting up to %.0fs for the "
                        "autoscaler", self._describe_need(), self.spec.start_timeout)
        remote_cls = ray.remote(self.worker_cls)
        self.plan_bytes = len(pickle.dumps(plan))
        threads = max(1, int(self.spec.cpus))
        storage = parse_storage_options(options.storage_options) if is_url(stage) else None
        self.slots = [_Slot(rank, remote_cls.options(**opts).remote(plan, stage, rank, device, budget, threads,
                                                                    storage_options=storage))
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
            slot.state = "started"
            slot.budget = slot.info["budget"]
        if problems:
            raise UserError("; ".join(problems))
        late = [s for s in self.slots if s.state == "starting"]
        for s in late:
            ray.kill(s.actor)
            s.state = "dead"
        live = [s for s in self.slots if s.state == "started"]
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
        """Hand out shards through a :class:`WorkPool` (one at a time per worker) in the order of a
        :class:`ShardQueue`; redo the shard of a worker that died; journal each result as it arrives."""
        if not is_url(stage):  # object storage: each worker streams its shards straight to their names
            os.makedirs(os.path.join(stage, ATTEMPTS_DIR), exist_ok=True)
        self._start_workers(plan, stage, options)
        live = [s for s in self.slots if s.state == "started"]
        known = [s.budget for s in live if s.budget is not None]
        if known:
            check_memory(plan, shards, max(known))
        queue = ShardQueue(plan, shards, {s.rank: s.budget for s in live})
        log.info("assignment: %s", "; ".join(f"worker {s.rank}: {len(queue.queues[s.rank])} shards" for s in live))
        self.pool = pool = WorkPool([s.actor for s in self.slots], lambda actor, index: actor.run_shard.remote(index),
                                    probe=lambda actor: actor.ping.remote())
        for s in self.slots:
            if s.state != "started":
                pool.retire(s.rank)
        by_index = {s.index: s for s in shards}
        attempts: dict[int, int] = {}
        done: dict[int, ShardResult] = {}

        for o in pool.outcomes(queue.next_for):
            slot = self.slots[o.actor]
            if o.kind == "result":
                self._take(slot, o.value, by_index, done, on_shard, progress)
                if len(done) == len(shards):
                    break
            elif o.kind == "died":
                idx = o.item
                attempts[idx] = attempts.get(idx, 0) + 1
                slot.failures += 1
                slot.stats["failures"] = slot.failures
                self.retries.append({"shard": idx, "worker": slot.rank, "error": type(o.error).__name__})
                log.warning("worker %d died during shard %d (%s); redoing it elsewhere", slot.rank, idx,
                            type(o.error).__name__)
                if attempts[idx] >= MAX_SHARD_ATTEMPTS:
                    raise self._lost(f"shard {by_index[idx].filename} failed {attempts[idx]} times, its worker "
                                     f"died each time (last: {type(o.error).__name__})")
                if idx not in done:
                    queue.requeue(idx)
                if slot.failures > MAX_RESTARTS:
                    pool.retire(slot.rank)
                    self._gone(slot, queue)
                # else the pool pings it: "actor_back" once Ray has restarted it, or "actor_gone"
            elif o.kind == "actor_gone":
                self._gone(slot, queue)
            elif o.kind == "error":
                cause = getattr(o.error, "cause", None)
                if isinstance(cause, (UserError, OSError)):
                    raise cause
                raise RuntimeError(f"shard {by_index[o.item].filename} failed on worker {slot.rank}: "
                                   f"{one_line(o.error)}") from None
        if len(done) < len(shards):
            left = sorted(set(by_index) - set(done))
            if not pool.live():
                raise self._lost(f"every merge worker died and Ray could not restart them; {len(left)} of "
                                 f"{len(shards)} shard(s) left undone")
            raise UserError(f"no live worker has the memory budget for shard(s) {_ranges(left)}")
        return [done[s.index] for s in shards]

    def _take(self, slot: _Slot, out: dict, by_index: dict, done: dict, on_shard, progress) -> None:
        """A shard's result: journaled (``on_shard``) as it arrives; a duplicate (a retried shard that
        finished twice, with the same bytes) is ignored."""
        self.driver_bytes_received += len(pickle.dumps(out))
        idx = out["index"]
        if idx in done:
            return
        res = ShardResult(idx, out["filename"], out["checksum"], out["nbytes"], list(by_index[idx].tensors),
                          out.get("non_finite", {}))
        done[idx] = res
        on_shard(res)
        self._record(slot, out)
        if progress is not None:
            progress.update(by_index[idx].nbytes)

    def _gone(self, slot: _Slot, queue: ShardQueue) -> None:
        queue.orphan(slot.rank)
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

