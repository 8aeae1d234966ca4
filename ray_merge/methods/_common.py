"""Small helpers shared by the method modules."""
from __future__ import annotations

from typing import Optional

from ray_merge.errors import UserError
from ray_merge.methods._deferred import deferred
from ray_merge.methods.base import MergeInputs

torch = deferred("torch")


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """Arithmetic precision for a method: float64 stays, everything else is float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def as_work(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``; no copy when it already is (never write to the result)."""
    return t if t.dtype == dtype else t.to(dtype)


def base_and_others(inp: MergeInputs, method: str, required: bool = True):
    """Split the inputs into the base tensor (or None) and the non-base ones.

    Returns ``(base, tensors, model_params)`` where the last two list only the
    non-base models, in input order.
    """
    if inp.base_index is None and required:
        raise UserError(f"merge method {method} needs a base_model")
    keep = [i for i in range(len(inp.tensors)) if i != inp.base_index]
    return (
        inp.base,
        [inp.tensors[i] for i in keep],
        [inp.model_params[i] for i in keep],
    )


def exactly(n: int, items: list, method: str, what: str = "non-base models") -> None:
    if len(items) != n:
        raise UserError(f"merge method {method} takes exactly {n} {what}; got {len(items)}")


def finish(result: torch.Tensor, like: Optional[torch.Tensor]) -> torch.Tensor:
    """Return in the input precision, as mergekit does (the recipe's ``dtype``)."""
    if like is not None and result.dtype != like.dtype:
        return result.to(like.dtype)
    return result


def _half(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def round_(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round float32 ``x`` in place to ``dtype``'s precision (no-op unless half).

    Methods that work in float32 use this to reproduce, step for step, the
    rounding of mergekit, which stores those intermediate results in the
    recipe's (half) dtype.
    """
    if _half(dtype) and x.dtype != dtype:
        x.copy_(x.to(dtype))
    return x


def round_scalar(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype``'s precision (unchanged unless half)."""
    if _half(dtype):
        return float(torch.tensor(value, dtype=dtype))
    return value
