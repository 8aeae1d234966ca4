"""The merge worker actor: holds the plan, merges the shards the driver sends it under its memory budget,
writes them to the staging directory and returns only checksums and statistics.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from typing import Optional

import ray_merge.methods  # noqa: F401  (register every method before the baseline)
from ray_merge.errors import UserError
from ray_merge.execute.loaders import TensorLoader
from ray_merge.execute.shards import ATTEMPTS_DIR, write_shards
from ray_merge.io.models import ModelRef, resolve_model_dir
from ray_merge.planner.memory import gpu_budget, rows_per_chunk
from ray_merge.planner.plan import InputModel, Plan

MAX_RESTARTS = 2  # Ray restarts a crashed worker actor this many times


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
                 threads: int = 1, storage_options: Optional[dict] = None):
        import ray
        import torch

        torch.set_num_threads(max(1, threads))
        self.rank = rank
        self.stage = stage
        self.storage_options = storage_options  # set: ``stage`` is an object-storage URL (fsspec)
        self.device = device
        self.problems: list[str] = []
        self.node_id = ray.get_runtime_context().get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.plan = self._localize(plan)
        self.shards = {s.index: s for s in self.plan.shards}
        if storage_options is None and not os.path.isdir(stage):
            self.problems.append(f"cannot see the output staging directory {stage}: the output must be on a "
                                 f"filesystem every node shares")
        self.gpu_total = 0
        if device.startswith("cuda"):
            if torch.cuda.is_available():
                self.gpu_total = torch.cuda.get_device_properties(0).total_memory
            else:
                self.problems.append("was given a GPU by Ray but torch sees no CUDA device")
        self.budget = budget if budget is not None else gpu_budget(self.gpu_total)
        # warm up (allocator, thread pools), then take the baseline every peak is measured against
        x = torch.ones(1 << 16)
        float(x.sum())
        del x
        self.baseline_rss = PeakMemory.rss()
        self.peak_rss = self.baseline_rss

    def _localize(self, plan: Plan) -> Plan:
        """Input paths as this node sees them: hub models come from this node's hub cache."""
        import copy

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
                models.append(InputModel(m.ref, resolve_model_dir(ref, weights=False)))  # weights: as read
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
        remote = self.storage_options is not None
        attempt = None if remote else os.path.join(self.stage, ATTEMPTS_DIR, f"{index:05d}-{uuid.uuid4().hex[:8]}")
        if attempt is not None:
            os.makedirs(attempt)
        mem = PeakMemory()
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        mem.start()
        try:
            # object storage: streamed to its final name (an object appears whole, once its upload completes)
            res = write_shards(self.plan, [shard], self.stage if remote else attempt,
                               loader=_ReleasingLoader(self.plan), device=self.device, memory_budget=self.budget,
                               storage_options=self.storage_options)[0]
            if attempt is not None:
                # a whole file or nothing: a worker killed mid-write leaves only its attempt directory
                os.replace(os.path.join(attempt, shard.filename), os.path.join(self.stage, shard.filename))
        finally:
            if attempt is not None:
                shutil.rmtree(attempt, ignore_errors=True)
        peak = mem.stop()
        self.peak_rss = max(self.peak_rss, peak)
        tensors = self.plan.shard_tensors(shard)
        return {
            "index": res.index, "filename": shard.filename, "checksum": res.checksum, "nbytes": res.nbytes,
            "non_finite": res.non_finite,
            "worker": self.rank, "node_id": self.node_id, "node_ip": self.node_ip, "pid": os.getpid(),
            "wall_s": time.time() - t0, "bytes_read": sum(pt.in_bytes for pt in tensors),
            "peak_rss": peak, "baseline_rss": self.baseline_rss,
            "peak_gpu": torch.cuda.max_memory_allocated() if cuda else 0,
            "chunked_tensors": sum(1 for pt in tensors if rows_per_chunk(pt, self.budget) is not None),
        }

