"""Arcee Fusion (mergekit v0.1 release)."""
from __future__ import annotations

from ray_merge.methods._common import base_and_others, exactly
from ray_merge.methods._deferred import deferred
from ray_merge.methods._select import kth_smallest
from ray_merge.methods.base import MergeInputs, merge_method

torch = deferred("torch")
F = deferred("torch.nn.functional")

_QUARTILES = (0.25, 0.5, 0.75)


def importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|model - base| scaled by the KL divergence, per vector along the last
    dimension, between the softmax of the model's values and of the base's."""
    p = F.softmax(model, dim=-1).add_(1e-8)
    q = F.softmax(base, dim=-1).add_(1e-8)
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    del p, q
    return torch.sub(model, base).abs_().mul_(kl)


@merge_method(
    "arcee_fusion",
    base_model="required",
    min_inputs=2,
    max_inputs=2,
    pretty_name="Arcee Fusion",
    reference_url="https://arcee.ai",
    description="takes the other model's parameters where their KL-weighted change is an outlier",
    extra={"workspace_tensors": 8, "workspace_per_input": 0, "half_result_dtype": "float32"},
)
def arcee_fusion(inp: MergeInputs) -> torch.Tensor:
    """Arcee Fusion: take the other model's value only where its change is
    salient, i.e. its importance is at least median + 1.5 * IQR of the tensor's
    importance scores (an outlier fence); elsewhere keep the base.

    Scores are computed in the input precision, like mergekit, so the fence
    falls in the same place; the result is float32 (base + masked change), as
    mergekit returns it. The quartiles are exact (mergekit estimates them from a
    random sample of 1M scores on larger tensors).
    """
    base, others, _ = base_and_others(inp, "arcee_fusion")
    exactly(1, others, "arcee_fusion")
    model = others[0]
    scores = importance(model, base)
    flat = scores.reshape(-1)
    n = flat.numel()
    if n == 0:
        return base.to(torch.promote_types(base.dtype, torch.float32))
    # Quantile q is the element at sorted position floor(q * (n - 1)), computed in float32.
    positions = (torch.tensor(_QUARTILES) * (n - 1)).long().tolist()
    wide = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    q1, median, q3 = (
        torch.tensor(s.value, dtype=flat.dtype)
        for s in kth_smallest(wide, [p + 1 for p in positions])
    )
    fence = median + 1.5 * (q3 - q1)
    result_dtype = torch.promote_types(base.dtype, torch.float32)  # the mask is float32 in mergekit
    change = torch.sub(model, base).to(result_dtype).mul_(scores >= fence)
    return change.add_(base)

