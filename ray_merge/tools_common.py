"""Shared plumbing for the extra tools (extract-lora, moe, multi).

Output directories follow the merge engine's convention: everything is written into
``<out>.ray-merge-partial`` and renamed into place when complete. Tensors are streamed
to safetensors files with the core ShardWriter. Ray sessions are started (or joined)
the same way for every tool.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from ray_merge.errors import UserError
from ray_merge.io.writer import ShardWriter
from ray_merge.output import TOKENIZER_FILES, staging_dir

DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
               "float64": torch.float64}


def note(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"ray-merge: note: {msg}", file=sys.stderr)


def begin_output(out_dir: str) -> str:
    """Check ``out_dir`` may be written and return a fresh staging directory for it."""
    from ray_merge.output import check_output_location

    stage = staging_dir(check_output_location(out_dir))
    if os.path.isdir(stage):  # an interrupted run of a tool without resume: start over
        shutil.rmtree(stage)
    os.makedirs(stage)
    return stage


def finish_output(stage: str, out_dir: str) -> None:
    out_dir = os.path.abspath(out_dir)
    if os.path.isdir(out_dir) and not os.listdir(out_dir):
        os.rmdir(out_dir)
    os.replace(stage, out_dir)


def abort_output(stage: str) -> None:
    shutil.rmtree(stage, ignore_errors=True)


def write_json(path: str, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


@dataclass
class OutTensor:
    """One tensor of an output file: its layout, and how to make it when its turn comes."""

    name: str
    shape: tuple
    dtype: str  # torch dtype name, e.g. "bfloat16"
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * getattr(torch, self.dtype).itemsize


def write_tensor_file(path: str, tensors: list[OutTensor],
                      on_tensor: Optional[Callable[[OutTensor], None]] = None) -> int:
    """Stream ``tensors`` into one safetensors file (one tensor in memory at a time); return its size."""
    writer = ShardWriter(path, [(t.name, tuple(t.shape), t.dtype) for t in tensors])
    try:
        for t in tensors:
            value = _dense(t.make().to(dtype=getattr(torch, t.dtype)))
            writer.write(t.name, value)
            del value
            if on_tensor:
                on_tensor(t)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return writer.total_bytes


def _dense(t: torch.Tensor) -> torch.Tensor:
    """Row-major with standard strides (contiguous() keeps odd strides on size-1 dimensions)."""
    expected, step = [], 1
    for d in reversed(t.shape):
        expected.append(step)
        step *= d
    if tuple(reversed(expected)) == t.stride():
        return t
    return torch.empty(t.shape, dtype=t.dtype).copy_(t)


def write_sharded(stage: str, tensors: list[OutTensor], max_shard_bytes: int, *,
                  on_tensor: Optional[Callable[[OutTensor], None]] = None) -> dict:
    """Write a model's weights as mergekit/transformers do: shards + model.safetensors.index.json."""
    groups: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    weight_map = {}
    for i, group in enumerate(groups):
        filename = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        write_tensor_file(os.path.join(stage, filename), group, on_tensor)
        for t in group:
            weight_map[t.name] = filename
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    if n > 1:
        write_json(os.path.join(stage, "model.safetensors.index.json"), index)
    return index


def copy_model_extras(src_dir: str, stage: str, *, tokenizer: bool = True) -> None:
    """Tokenizer files and generation_config.json from ``src_dir``."""
    names = list(TOKENIZER_FILES) if tokenizer else []
    names.append("generation_config.json")
    for name in names:
        src = os.path.join(src_dir, name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(stage, name))


def versions() -> dict:
    from ray_merge import output

    return output._versions()


# ---------------------------------------------------------------------------
# Ray
# ---------------------------------------------------------------------------


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
