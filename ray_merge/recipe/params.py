"""Parameter values as a recipe gives them: scalars, gradients (interpolated over layers) and filtered
lists (first matching tensor-name filter wins), resolved for one tensor at relative depth ``t``.
"""
from __future__ import annotations

from typing import Any


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (bool, int, float, str))


_MISSING = object()


def evaluate_setting(setting: Any, tensor_name: str, t: float, kind: type) -> Any:
    """Resolve one parameter setting for a tensor at gradient position ``t`` in [0, 1].

    Returns ``_MISSING`` when no condition matches. Numeric gradients interpolate
    linearly between evenly spaced anchors; non-numeric lists pick the nearest lower.
    """
    if isinstance(setting, dict):
        setting = [setting]
    if _is_scalar(setting):
        return _coerce(setting, kind)
    if isinstance(setting, list):
        if all(_is_scalar(v) for v in setting):
            values = [_coerce(v, kind) for v in setting]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                return values[int(t * (len(values) - 1))]
            pos = t * (len(values) - 1)
            i0 = int(pos)
            i1 = min(len(values) - 1, i0 + 1)
            frac = pos - i0
            return _coerce((1 - frac) * values[i0] + frac * values[i1], kind)
        for cond in setting:
            flt = cond.get("filter")
            if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
                return evaluate_setting(cond["value"], tensor_name, t, kind)
    return _MISSING


def _coerce(v: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(v, str):
            return v.strip().lower() in ("1", "true", "yes", "on")
        return bool(v)
    if kind is int and not isinstance(v, bool):
        try:
            return int(v) if float(v) == int(float(v)) else float(v)
        except (TypeError, ValueError):
            return v
    if kind is float and isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def resolve(param, scopes: list[dict], tensor_name: str, t: float) -> Any:
    """First scope (highest precedence first) that sets ``param`` for this tensor wins."""
    for scope in scopes:
        if scope and param.name in scope:
            value = evaluate_setting(scope[param.name], tensor_name, t, param.kind)
            if value is not _MISSING and value is not None:
                return value
    return _MISSING
