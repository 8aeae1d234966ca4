"""NearSwap (alchemonaut, QuartetAnemoi-70B-t0.0001)."""
from __future__ import annotations

from ray_merge.methods._common import base_and_others, exactly
from ray_merge.methods._deferred import deferred
from ray_merge.methods.base import MergeInputs, Param, merge_method

torch = deferred("torch")


@merge_method(
    "nearswap",
    params=[Param("t", min=0.0, help="similarity scale: parameters closer than t are swapped fully")],
    base_model="required",
    min_inputs=2,
    max_inputs=2,
    row_splittable=True,
    pretty_name="NearSwap",
    reference_url="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    description="interpolates towards the other model where the parameters are already close",
    extra={"workspace_tensors": 5, "workspace_per_input": 0},
)
def nearswap(inp: MergeInputs) -> torch.Tensor:
    """NearSwap: move each base parameter towards the other model's value by
    ``min(1, t / |base - other|)``: all the way where the two nearly agree, barely
    where they differ a lot. Element-wise, in the inputs' precision."""
    base, others, _ = base_and_others(inp, "nearswap")
    exactly(1, others, "nearswap")
    other = others[0]
    t = float(inp.params["t"])
    weight = (t / torch.sub(base, other).abs_().clamp_(min=1e-6)).clamp_(0, 1)
    return weight * other + (1 - weight) * base

