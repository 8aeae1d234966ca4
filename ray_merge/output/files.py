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
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ray_merge.io.tokenizers import TOKENIZER_FILES
from ray_merge.io.writer import ShardWriter
from ray_merge.output.staging import LOCK, check_output_location, lock_staging, staging_dir


def begin_output(out_dir: str) -> str:
    """Check ``out_dir`` may be written and return a fresh staging directory for it."""

    stage = staging_dir(check_output_location(out_dir))
    if os.path.isdir(stage):  # an interrupted run of a tool without resume: start over
        if os.path.exists(os.path.join(stage, LOCK)):
            lock_staging(stage).close()  # fails, naming the run, while a merge is writing there
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



# ---------------------------------------------------------------------------
# Ray
# ---------------------------------------------------------------------------
