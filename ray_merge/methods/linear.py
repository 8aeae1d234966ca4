"""Weighted averages: linear and passthrough; and the planner's internal copy."""
from __future__ import annotations

from ray_merge.methods._common import finish, work_dtype
from ray_merge.methods._deferred import deferred
from ray_merge.methods.base import MergeInputs, Param, merge_method

torch = deferred("torch")


@merge_method(
    "linear",
    params=[
        Param("weight", per_model=True, help="weight of this model"),
        Param("normalize", default=True, kind=bool, help="divide by the sum of weights"),
    ],
    base_model="none",
    row_splittable=True,
    pretty_name="Linear",
    reference_url="https://arxiv.org/abs/2203.05482",
    extra={"workspace_tensors": 2, "workspace_per_input": 0},
)
def linear(inp: MergeInputs) -> torch.Tensor:
    """Model soup: the weighted average of the models (weighted sum without
    ``normalize``). Accumulates in float32 (float64 stays), like mergekit."""
    first = inp.tensors[0]
    dtype = work_dtype(first)
    weights = [float(p["weight"]) for p in inp.model_params]
    out = torch.zeros(first.shape, dtype=dtype)
    for w, t in zip(weights, inp.tensors):
        out.add_(t, alpha=w)
    if inp.params["normalize"]:
        total = sum(weights)
        if total != 0:
            out.div_(total)
    return finish(out, first)


@merge_method(
    "passthrough",
    params=[Param("scale", default=None, per_model=True, help="multiply the tensor by this")],
    base_model="none",
    row_splittable=True,
    max_inputs=1,
    pretty_name="Passthrough",
    description="copies tensors unchanged; used for frankenmerges with slices",
    extra={"workspace_tensors": 1, "workspace_per_input": 0},
)
def passthrough(inp: MergeInputs) -> torch.Tensor:
    """Copy the single input tensor, optionally multiplied by ``scale``."""
    if len(inp.tensors) != 1:
        raise ValueError("passthrough takes exactly one input model per slice")
    scale = inp.model_params[0].get("scale")
    t = inp.tensors[0]
    return t * scale if scale is not None else t


@merge_method(
    "copy",
    internal=True,
    base_model="none",
    row_splittable=True,
    description="the first input, unchanged: what the planner plans for non-float buffers "
    "(integer position ids, masks), which are copied, not merged",
    extra={"workspace_tensors": 1, "workspace_per_input": 0},
)
def copy(inp: MergeInputs) -> torch.Tensor:
    """A copy of the first input tensor."""
    return inp.tensors[0].clone()
