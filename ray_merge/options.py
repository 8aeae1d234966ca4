"""Options of a merge and of its workers: plain data, read by every layer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

DEFAULT_SHARD_BYTES = 5_000_000_000  # output shard size (mergekit's default --out-shard-size)


def in_ray_job() -> bool:
    """True when running as the entrypoint of a Ray job (`ray job submit -- ray-merge run ...`)."""
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") and os.environ.get("RAY_ADDRESS"))


@dataclass
class MergeOptions:
    device: str = "cpu"
    random_seed: Optional[int] = None
    out_shard_bytes: int = DEFAULT_SHARD_BYTES
    memory_budget: Optional[int] = None  # bytes; None: a safe share of RAM
    copy_tokenizer: bool = True
    write_model_card: bool = True
    allow_crimes: bool = False
    trust_remote_code: bool = False
    resume: bool = False
    quiet: bool = False
    extra: dict = field(default_factory=dict)


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
        """Workers run on a cluster we did not start (an address, or the cluster of our Ray job)."""
        return bool(self.address) or in_ray_job()
