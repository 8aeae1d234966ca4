"""Merging one planned tensor from its input tensors: the method call, dtypes, devices, blocks."""
from __future__ import annotations

import hashlib
from typing import Optional

import torch

from ray_merge.methods import MergeInputs, get_method
from ray_merge.planner.plan import PlannedTensor


def tensor_seed(seed: Optional[int], name: str) -> int:
    """A per-tensor seed, so random methods never depend on order or partitioning."""
    digest = hashlib.sha256(f"{seed or 0}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# Element-wise methods run over blocks of about this many elements: the working set stays in
# the CPU cache, and torch spreads each op over the cores (a thread per block instead nests
# OpenMP teams, which measured 10-20% slower on 2 cores).
BLOCK_ELEMENTS = 1 << 17


def compute_tensor(pt: PlannedTensor, inputs: list[torch.Tensor], seed: Optional[int],
                   device: str = "cpu") -> torch.Tensor:
    """Merge one output tensor from its (already read) inputs."""
    method = get_method(pt.method, internal=True)
    dtype = getattr(torch, pt.compute_dtype) if pt.compute_dtype else None
    out_dtype = getattr(torch, pt.out_dtype)
    generator = None
    if method.randomized:
        generator = torch.Generator(device="cpu").manual_seed(tensor_seed(seed, pt.name))

    def merge(tensors: list[torch.Tensor]) -> torch.Tensor:
        tensors = [t.to(device=device, dtype=dtype or t.dtype) for t in tensors]
        return method.merge(MergeInputs(tensors=tensors, base_index=pt.base_index, model_params=pt.model_params,
                                        params=pt.params, generator=generator, name=pt.name))

    numel = inputs[0].numel()
    if (device == "cpu" and method.row_splittable and not method.randomized and inputs[0].dim() >= 1
            and numel >= 4 * BLOCK_ELEMENTS):
        # identical to merging the whole tensor: row-splittable methods are element-wise per row
        rows = inputs[0].shape[0]
        step = max(1, BLOCK_ELEMENTS // max(1, numel // rows))
        out = torch.empty(inputs[0].shape, dtype=out_dtype)

        def block(start: int) -> None:
            out[start:start + step] = merge([t[start:start + step] for t in inputs]).to(out_dtype)

        for start in range(0, rows, step):
            block(start)
        return out
    return merge(inputs).to(device="cpu", dtype=out_dtype)
