"""SCE: Select, Calculate, Erase (Wan et al., FuseChat, 2024)."""
from __future__ import annotations

from ray_merge.methods._common import base_and_others, work_dtype
from ray_merge.methods._deferred import deferred
from ray_merge.methods._select import top_k_mask, use_mergekit_sort
from ray_merge.methods.base import MergeInputs, Param, merge_method
from ray_merge.methods.consensus import elect_sign

torch = deferred("torch")


def _select_mask(task_vectors: torch.Tensor, fraction: float) -> torch.Tensor:
    """Positions whose task-vector variance across models is in the top
    ``fraction`` of the positions with non-zero variance."""
    shape = task_vectors.shape[1:]
    if fraction <= 0:
        return torch.zeros(shape, dtype=torch.bool)
    if fraction >= 1:
        return torch.ones(shape, dtype=torch.bool)
    var = torch.var(task_vectors, dim=0, unbiased=False).reshape(-1)
    # mergekit's arithmetic: the count times the fraction in float32, floored.
    k = int(torch.count_nonzero(var) * fraction)
    if k == 0:
        return torch.zeros(shape, dtype=torch.bool)
    if use_mergekit_sort(var.numel()):
        mask = torch.zeros(var.numel(), dtype=torch.bool)
        mask[torch.topk(var.abs(), k=k, largest=True).indices] = True
    else:
        mask = top_k_mask(var.abs().to(work_dtype(var)), k, nonnegative=True)
    return mask.view(shape)


@merge_method(
    "sce",
    params=[
        Param("select_topk", 1.0, min=0.0, max=1.0,
              help="fraction of positions to keep, by variance across models (1 keeps all)"),
        Param("int8_mask", False, kind=bool,
              help="accepted for mergekit compatibility; masks are always compact here"),
    ],
    base_model="required",
    pretty_name="SCE",
    reference_url="https://arxiv.org/abs/2408.07990",
    description="variance selection, mean-square weighting and sign erasure of task vectors",
    extra={"workspace_tensors": 4, "workspace_per_input": 3},
)
def sce(inp: MergeInputs) -> torch.Tensor:
    """SCE: per tensor,

    1. Select: zero the positions whose task vectors vary least across models,
       keeping the top ``select_topk`` fraction by variance (1.0 keeps all).
    2. Calculate: weight each model by the mean square of its (selected) task
       vector, normalised to sum to one (equal weights when all are ~0).
    3. Erase: drop entries whose sign disagrees with the sign of the summed
       task vectors (TIES election).
    The surviving entries are averaged with those weights and added to the
    base. Arithmetic is in the inputs' precision, as mergekit's.
    """
    base, others, _ = base_and_others(inp, "sce")
    if not others:
        return base
    task_vectors = torch.stack([m - base for m in others])

    fraction = float(inp.params["select_topk"])
    if fraction < 1:
        task_vectors.mul_(_select_mask(task_vectors, fraction))

    sign = elect_sign(task_vectors)
    agree = (torch.sign(task_vectors) == sign).to(task_vectors.dtype)
    del sign
    n = len(others)
    mean_squares = task_vectors.square().reshape(n, -1).mean(dim=1)
    total = float(mean_squares.sum())
    if abs(total) < 1e-6:
        weights = torch.full_like(mean_squares, 1.0 / n)
    else:
        weights = mean_squares / total
    agree.mul_(weights.view(n, *[1] * base.dim()))  # each model's weight where it agrees
    merged = (task_vectors * agree).sum(dim=0)
    return base + merged / agree.sum(dim=0).clamp(min=1e-6)

