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
            print(f"    {p.name:<18} {scope:<9} {default:<16} {p.help}")
    return 0
