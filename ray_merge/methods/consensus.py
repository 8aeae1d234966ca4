"""TIES sign election: keep only the task-vector entries that agree in sign.

Yadav et al. (2023) resolve interference between task vectors by electing, per
entry, the sign with the greater total mass and dropping every entry of the
other sign before averaging.
"""
from __future__ import annotations

from typing import Optional, Sequence

from ray_merge.methods._deferred import deferred

torch = deferred("torch")


SUM = "sum"  # elect the sign of the summed entries (the TIES paper)
COUNT = "count"  # elect the sign held by more models
METHODS = (SUM, COUNT)

def elect_sign(
    deltas: Sequence[torch.Tensor], method: str = SUM, scales: Optional[Sequence[float]] = None
) -> torch.Tensor:
    """+1/-1 per entry, electing +1 on a tie.

    ``deltas`` is a sequence of same-shape tensors or a stacked ``[n, ...]``
    tensor (summed in one reduction, as mergekit does in half precision).
    ``scales`` (positive, one per delta) weight the deltas without a separate
    pass.
    """
    if method == COUNT:
        deltas, scales = [torch.sign(d) for d in deltas], None
    elif method != SUM:
        raise ValueError(f"unknown consensus method {method!r}")
    if isinstance(deltas, torch.Tensor):
        total = deltas.sum(dim=0)
    else:
        scales = scales or [1.0] * len(deltas)
        total = torch.mul(deltas[0], scales[0])
        product = torch.empty_like(total) if len(deltas) > 1 else None
        for d, c in zip(deltas[1:], scales[1:]):
            # each product rounded before the sum, as mergekit's weighted deltas are: add_(d, alpha=c) may
            # fuse the multiply-add into one rounding, which flips the sign where two deltas cancel exactly
            torch.mul(d, c, out=product)
            total.add_(product)
    # sign() is -1, 0 or 1; +0.5 then sign() again sends 0 (a tie) to +1. Cheaper than copysign.
    return total.sign_().add_(0.5).sign_()


def agreeing_sum_(
    deltas: Sequence[torch.Tensor],
    sign: torch.Tensor,
    weights: Optional[Sequence[float]] = None,
    scales: Optional[Sequence[float]] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Sum of the entries of ``deltas`` (overwritten) whose sign equals ``sign``,
    each delta multiplied by its positive ``scale`` (default 1).

    Zero entries never agree. With ``weights`` (one per delta) also returns the
    total weight of the agreeing models at each entry, else None.
    """
    scales = scales or [1.0] * len(deltas)
    mixed = None
    agreeing_weight = torch.zeros_like(sign) if weights is not None else None
    for i, delta in enumerate(deltas):
        # delta * sign is positive exactly where delta agrees with the election.
        delta.mul_(sign)
        if agreeing_weight is not None:
            agreeing_weight.add_(delta > 0, alpha=weights[i])
        delta.clamp_(min=0)
        # (a fresh accumulator: a view might keep a larger buffer alive)
        mixed = torch.mul(delta, scales[i]) if mixed is None else mixed.add_(delta, alpha=scales[i])
    return mixed.mul_(sign), agreeing_weight
