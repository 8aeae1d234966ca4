"""Merging one planned tensor from its input tensors: the method call, dtypes, devices, blocks."""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Optional

import torch

from ray_merge.methods import MergeInputs, get_method
from ray_merge.parallel import intra_op_threads, memory_bound_threads
from ray_merge.planner.plan import PlannedTensor


def tensor_seed(seed: Optional[int], name: str) -> int:
    """A per-tensor seed, so random methods never depend on order or partitioning."""
    digest = hashlib.sha256(f"{seed or 0}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# Element-wise methods (row_splittable) run over blocks of about this many elements: the working set stays in
# the CPU cache, and torch spreads each op over the cores (a thread per block instead nests
# OpenMP teams, which measured 10-20% slower on 2 cores). They are memory-bound and their
# tensors stream through the reader and writer threads, whose page-cache copies need a core:
# they get one thread fewer (linear on 2 cores, out of core: 1.13x faster; in the page cache: as fast or
# faster).
BLOCK_ELEMENTS = 1 << 17


def compute_tensor(pt: PlannedTensor, inputs: list[torch.Tensor], seed: Optional[int],
                   device: str = "cpu") -> torch.Tensor:
    """Merge one output tensor from its (already read) inputs."""
    if pt.packed is not None:
        return _compute_packed(pt, inputs, seed, device)
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

        with intra_op_threads(memory_bound_threads()):
            for start in range(0, rows, step):
                block(start)
        return out
    return merge(inputs).to(device="cpu", dtype=out_dtype)


def _compute_packed(pt: PlannedTensor, inputs: list[torch.Tensor], seed: Optional[int], device: str) -> torch.Tensor:
    """A tensor packing one block per layer, merged block by block: each output block from its source blocks,
    with its own layer's parameters. ``inputs``: the whole inputs, or the same rows of each when the blocks
    are columns (a row chunk)."""
    pk = pt.packed
    w = pk.width
    shape = list(pt.shape)
    if pk.dim != 0:
        shape[0] = inputs[0].shape[0]
    out = torch.empty(shape, dtype=getattr(torch, pt.out_dtype))
    for j, block in enumerate(pk.blocks):
        parts = [inputs[k].narrow(pk.dim, b * w, w).contiguous() for k, b in zip(block.inputs, block.blocks)]
        sub = dataclasses.replace(
            pt, name=f"{pt.name}[block {j}]", shape=tuple(parts[0].shape), packed=None,
            inputs=[pt.inputs[k] for k in block.inputs], base_index=block.base_index, params=block.params,
            model_params=list(block.model_params))
        out.narrow(pk.dim, j * w, w).copy_(compute_tensor(sub, parts, seed, device))
        del parts
    return out
