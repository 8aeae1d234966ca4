"""`ray-merge methods`: the merge methods and their parameters.
"""
from __future__ import annotations

BASE_MODEL = {"required": "base model required", "optional": "base model optional", "none": "no base model"}


def add_parser(sub) -> None:
    p = sub.add_parser("methods", help="list merge methods and their parameters")
    p.set_defaults(func=cmd_methods)


def cmd_methods(args) -> int:
    from ray_merge.methods import all_methods
    from ray_merge.methods.base import REQUIRED

    for m in all_methods().values():
        flags = [BASE_MODEL[m.base_model]]
        if m.randomized:
            flags.append("randomised")
        print(f"{m.name}  ({', '.join(flags)})")
        for p in m.params:
            scope = "per model" if p.per_model else "global"
            default = "required" if p.default is REQUIRED else f"default {p.default!r}"
            print(f"    {p.name:<18} {scope:<9} {default:<16} {_range(p):<10} {p.help}")
    return 0


def _range(p) -> str:
    """A parameter's valid range as the recipe check enforces it: [0, 1], >= 0, any."""
    if p.kind is bool:
        return "bool"
    if p.min is not None and p.max is not None:
        return f"[{p.min:g}, {p.max:g}]"
    if p.min is not None:
        return f">= {p.min:g}"
    if p.max is not None:
        return f"<= {p.max:g}"
    return "any"
