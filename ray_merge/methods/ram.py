"""RAM and RAM+: Reinforced Agent Merging (arXiv 2601.13572).

RL fine-tuning leaves sparse, heterogeneous task vectors; averaging them dilutes
each model's few changes. RAM classifies every entry by how many models change
it (|delta| > ``epsilon``): untouched entries keep the base value, entries only
one model changes take that change whole, and entries several models change take
the mean of their changes. Arithmetic is in the inputs' precision, as mergekit's.
"""
from __future__ import annotations

from ray_merge.methods._common import base_and_others
from ray_merge.methods._deferred import deferred
from ray_merge.methods.base import MergeInputs, Param, merge_method

torch = deferred("torch")

_EPSILON = Param("epsilon", 1e-5, min=0.0, help="changes at or below this magnitude count as none")


def _changes(inp: MergeInputs, name: str):
    """Task vectors ``[n, numel]`` with entries at or below epsilon zeroed, the
    mask of changed entries and the number of models changing each entry."""
    base, others, _ = base_and_others(inp, name)
    if not others:
        return base, None, None, None
    task_vectors = torch.stack([(m - base).reshape(-1) for m in others])
    changed = task_vectors.abs() > float(inp.params["epsilon"])
    task_vectors.mul_(changed)
    return base, task_vectors, changed, changed.sum(dim=0)


@merge_method(
    "ram",
    params=[_EPSILON],
    base_model="required",
    row_splittable=True,
    pretty_name="Reinforced Agent Merging",
    reference_url="https://arxiv.org/abs/2601.13572",
    description="keeps changes made by one model, averages changes made by several",
    extra={"workspace_tensors": 3, "workspace_per_input": 3},
)
def ram(inp: MergeInputs) -> torch.Tensor:
    """RAM: unique changes are kept whole, shared changes are averaged."""
    base, task_vectors, _, contributors = _changes(inp, "ram")
    if task_vectors is None:
        return base
    # At unique entries the division is by one, at untouched ones everything is zero.
    merged = (task_vectors / contributors.clamp(min=1)).sum(dim=0)
    return base + merged.view(base.shape)


@merge_method(
    "ramplus_tl",
    params=[
        Param("r", 0.1, help="strength of the boost to unique changes"),
        Param("alpha", 0.2, min=0.0, help="upper bound of the shared/unique ratio"),
        _EPSILON,
    ],
    base_model="required",
    pretty_name="Reinforced Agent Merging Plus (Tensor-Local)",
    reference_url="https://arxiv.org/abs/2601.13572",
    description="RAM with unique changes boosted by the tensor's shared/unique ratio",
    extra={"workspace_tensors": 4, "workspace_per_input": 4, "half_result_dtype": "float32"},
)
def ramplus_tl(inp: MergeInputs) -> torch.Tensor:
    """RAM+ (tensor-local): as RAM, but each model's unique changes are scaled up
    by ``1 + r * clip(rho, 0, alpha)``, where ``rho`` is the ratio of that model's
    shared to unique changed entries in this tensor, compensating for the
    dilution its shared changes suffer from averaging. The boost is float32, and
    so is the result (as in mergekit)."""
    base, task_vectors, changed, contributors = _changes(inp, "ramplus_tl")
    if task_vectors is None:
        return base
    r, alpha = float(inp.params["r"]), float(inp.params["alpha"])
    eps = float(inp.params["epsilon"])
    unique = contributors == 1
    shared = contributors > 1
    rho = (changed & shared).sum(dim=1) / (changed & unique).sum(dim=1).clamp(min=eps)
    boost = 1 + r * rho.clamp(min=0, max=alpha)
    unique_part = (task_vectors * unique) * boost.unsqueeze(-1)
    shared_part = task_vectors * shared / contributors.clamp(min=1)
    merged = (unique_part + shared_part).sum(dim=0)
    return base + merged.view(base.shape)

