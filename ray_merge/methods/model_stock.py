"""Model Stock (Jang et al., 2024)."""
from __future__ import annotations

from ray_merge.errors import UserError
from ray_merge.methods._common import base_and_others
from ray_merge.methods._deferred import deferred
from ray_merge.methods.base import MergeInputs, Param, merge_method

torch = deferred("torch")


@merge_method(
    "model_stock",
    params=[Param("filter_wise", False, kind=bool, help="compute t per row, not per tensor")],
    base_model="required",
    min_inputs=3,
    min_non_base=2,
    pretty_name="Model Stock",
    reference_url="https://arxiv.org/abs/2403.19522",
    description="interpolates base and average with a weight from the task vectors' angles",
    extra={"workspace_tensors": 4, "workspace_per_input": 2},
)
def model_stock(inp: MergeInputs) -> torch.Tensor:
    """Model Stock: fine-tuned weights lie on a thin shell around their centre;
    the best point between the base w0 and the average of the N fine-tuned models
    is t * avg + (1 - t) * w0 with t = N cos / (1 + (N - 1) cos), where cos is
    the mean pairwise cosine between the models' task vectors. ``filter_wise``
    computes t per row instead of per tensor. Where 1 + (N - 1) cos vanishes,
    t = 0 (the base). Arithmetic is in the inputs' precision, as mergekit's.
    """
    base, others, _ = base_and_others(inp, "model_stock")
    n = len(others)
    if n < 2:
        raise UserError(f"merge method model_stock needs at least 2 non-base models; got {n}")
    if inp.params["filter_wise"]:
        view = base.shape if base.dim() >= 2 else (1, -1)
    else:
        view = (-1,)
    w0 = base.reshape(view)
    models = [m.reshape(view) for m in others]
    offsets = [m - w0 for m in models]
    norms = [torch.linalg.vector_norm(o, dim=-1) for o in offsets]
    cosines = []
    for a in range(n):
        for b in range(a + 1, n):
            dot = (offsets[a] * offsets[b]).sum(dim=-1)
            cosines.append((dot / (norms[a] * norms[b]).clamp(min=1e-6)).clamp(-1, 1))
    del offsets
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0, n * cos / torch.where(singular, 1, denominator))
    average = sum(models) / n
    return (t * average + (1 - t) * w0).reshape(base.shape)

