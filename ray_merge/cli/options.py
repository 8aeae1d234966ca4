"""Command-line flags shared by commands: the Ray worker flags and what they turn into.
"""
from __future__ import annotations

import argparse
import os

from ray_merge.errors import UserError
from ray_merge.execute.ray.actor import TEST_DELAY_ENV
from ray_merge.execute.ray.driver import RayExecutor
from ray_merge.options import MergeOptions, WorkerSpec
from ray_merge.planner.memory import check_memory, planned_budgets
from ray_merge.planner.plan import Plan
from ray_merge.planner.shards import assign_shards, format_assignment


def add_worker_options(p: argparse.ArgumentParser) -> None:
    from ray_merge.units import parse_size

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
