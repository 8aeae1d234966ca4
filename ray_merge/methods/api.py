"""Call a merge method directly on in-memory tensors (tests, notebooks).

The planner resolves parameters per tensor from a recipe; this fills in the
defaults for a single call, the way the planner does.
"""
from __future__ import annotations

from typing import Optional, Sequence

from ray_merge.errors import UserError
from ray_merge.methods._deferred import deferred
from ray_merge.methods.base import MergeInputs, MergeMethod, get_method

torch = deferred("torch")


def resolve_params(
    method: MergeMethod,
    n_inputs: int,
    base_index: Optional[int] = None,
    params: Optional[dict] = None,
    model_params: Optional[Sequence[dict]] = None,
) -> tuple[dict, list[dict]]:
    """Global and per-model parameters with defaults filled in.

    Unknown names and missing required values are UserErrors. The base model
    gets no value for a ``non_base`` parameter it was not given.
    """
    params = dict(params or {})
    model_params = [dict(m) for m in (model_params or [{} for _ in range(n_inputs)])]
    if len(model_params) != n_inputs:
        raise ValueError("model_params needs one dict per input tensor")
    known = {p.name for p in method.params}
    for given in [params, *model_params]:
        unknown = set(given) - known
        if unknown:
            raise UserError(f"unknown parameter(s) for {method.name}: {', '.join(sorted(unknown))}")
    resolved = {}
    for p in method.global_params:
        if p.name in params:
            resolved[p.name] = params[p.name]
        elif p.required:
            raise UserError(f"merge method {method.name} needs parameter {p.name}")
        else:
            resolved[p.name] = p.default
    per_model = []
    for i, given in enumerate(model_params):
        is_base = i == base_index and method.base_model != "none"
        values = {}
        for p in method.model_params:
            if p.name in given:
                values[p.name] = given[p.name]
            elif p.name in params:  # a global value applies to every model
                values[p.name] = params[p.name]
            elif not p.required:
                values[p.name] = p.default
            elif not (is_base and p.non_base):
                raise UserError(f"merge method {method.name} needs parameter {p.name} for model {i}")
        per_model.append(values)
    return resolved, per_model


def merge_tensors(
    method: str | MergeMethod,
    tensors: Sequence[torch.Tensor],
    *,
    base_index: Optional[int] = None,
    params: Optional[dict] = None,
    model_params: Optional[Sequence[dict]] = None,
    seed: int = 0,
    name: str = "",
) -> torch.Tensor:
    """Merge one tensor's inputs with ``method``; randomness comes from ``seed``."""
    if isinstance(method, str):
        method = get_method(method)
    method.check_inputs(len(tensors), base_index is not None, where=name)
    resolved, per_model = resolve_params(method, len(tensors), base_index, params, model_params)
    generator = torch.Generator().manual_seed(seed)
    return method.merge(
        MergeInputs(
            tensors=list(tensors),
            base_index=base_index,
            model_params=per_model,
            params=resolved,
            generator=generator,
            name=name,
        )
    )
