"""The options table (ray_merge/options.py) as argparse flags, and parsed flags back as options.

``add_options(parser, MergeOptions)`` adds a group's flags; ``options_from_args(args, MergeOptions)``
builds the dataclass from what was parsed. Only the Ray worker helpers below import more than the table.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Iterable, Optional

from ray_merge.errors import UserError
from ray_merge.options import NOTED_FLAGS, CommandFlags, MergeOptions, WorkerSpec
from ray_merge.units import parse_size

_TYPES = {"int": int, "float": float, "str": None, "size": parse_size}


def _dest(meta: dict) -> str:
    if meta["dest"]:
        return meta["dest"]
    longs = [f for f in meta["flags"] if f.startswith("--")] or meta["flags"]
    return longs[0].lstrip("-").replace("-", "_")


def _flagged(group, only: Optional[Iterable[str]]):
    """The fields of ``group`` that have a flag, in ``only``'s order when given."""
    by_name = {f.name: f for f in fields(group) if "flags" in f.metadata}
    names = list(only) if only is not None else list(by_name)
    return [by_name[n] for n in names]


def _default(f):
    return f.default_factory() if callable(f.default_factory) else f.default


def add_options(parser, group, only: Optional[Iterable[str]] = None, help: Optional[dict] = None) -> None:
    """Add the flags of ``group``'s options (those named in ``only``, else all) to ``parser`` (a parser or an
    argument group). ``help``: field name -> help text where a command means something narrower."""
    for f in _flagged(group, only):
        meta = f.metadata
        kw = {"dest": _dest(meta), "help": (help or {}).get(f.name, meta["help"]) or None}
        kind = meta["kind"]
        if kind == "switch":
            kw.update(action="store_true")
        elif kind == "toggle":
            kw.update(action=argparse.BooleanOptionalAction, default=f.default)
        elif kind == "count":
            kw.update(action="count", default=f.default)
        elif kind in ("list", "resources"):
            kw.update(action="append", default=[], metavar=meta["metavar"])
        else:
            kw.update(type=_TYPES[kind], default=_default(f), metavar=meta["metavar"], choices=meta["choices"])
            if meta["required"]:
                kw.update(required=True)
                del kw["default"]
        parser.add_argument(*meta["flags"], **kw)
        if meta["shortcut"]:
            flag, _, text = meta["shortcut"]
            parser.add_argument(flag, dest=flag.lstrip("-").replace("-", "_"), action="store_true", help=text)


def options_from_args(args, group, **values):
    """``group`` built from the parsed flags of its options (those a command does not take: defaults);
    ``values`` set other fields."""
    for f in _flagged(group, None):
        meta = f.metadata
        dest = _dest(meta)
        if not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if meta["shortcut"] and getattr(args, meta["shortcut"][0].lstrip("-").replace("-", "_"), False):
            value = meta["shortcut"][1]
        if meta["kind"] == "resources":
            value = _resources(value, meta["flags"][0])
        values.setdefault(f.name, value)
    return group(**values)


def _resources(items: list[str], flag: str) -> dict:
    out = {}
    for item in items or []:
        name, sep, amount = item.partition("=")
        try:
            out[name.strip()] = float(amount) if sep else 1.0
        except ValueError:
            raise UserError(f"{flag} takes NAME=AMOUNT, got {item!r}")
    return out


def merge_options(args) -> MergeOptions:
    """The merge options given on the command line, the device checked."""
    from ray_merge.devices import resolve_device

    options = options_from_args(args, MergeOptions)
    options.device = resolve_device(options.device)
    return options


def add_noted_flags(parser, flags: Iterable[str]) -> None:
    """mergekit's flags that change nothing here: accepted, hidden from --help, noted when given."""
    for flag in flags:
        parser.add_argument(flag, action="store_true", help=argparse.SUPPRESS)


def print_notes(args) -> None:
    for flag, note in NOTED_FLAGS.items():
        if getattr(args, flag.lstrip("-").replace("-", "_"), False):
            print(f"ray-merge: note: {flag} {note}", file=sys.stderr)


TOOL_NOTED_FLAGS = ("--lazy-unpickle", "--low-cpu-memory", "--read-to-gpu", "--async-write", "--multi-gpu",
                    "--no-lazy-unpickle")


def add_tool_flags(p) -> None:
    """Flags extract-lora and moe share: the device, remote code, output verbosity, mergekit's no-ops."""
    add_options(p, MergeOptions, only=["device", "trust_remote_code"])
    add_options(p, CommandFlags, only=["verbose"])
    add_options(p, MergeOptions, only=["quiet"])
    add_noted_flags(p, TOOL_NOTED_FLAGS)


# ---------------------------------------------------------------------------------------------
# Ray workers
# ---------------------------------------------------------------------------------------------

def add_worker_options(p: argparse.ArgumentParser, help: Optional[dict] = None) -> None:
    g = p.add_argument_group("Ray workers (merge across processes and nodes)")
    add_options(g, WorkerSpec, help=help)


def wants_ray(args) -> bool:
    return bool(getattr(args, "workers", None) or getattr(args, "address", None))


def spec_from_args(args) -> WorkerSpec:
    spec = options_from_args(args, WorkerSpec)
    check_workers(args)
    spec.cpus = spec.cpus or 1.0
    device = options_from_args(args, MergeOptions).device
    if device.startswith("cuda") and spec.gpus == 0:
        spec.gpus = 1.0  # --device cuda with workers: one GPU each
    return spec


def check_workers(args) -> None:
    workers = getattr(args, "workers", None)
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")


def worker_spec(args) -> Optional[WorkerSpec]:
    """The Ray worker spec from --workers/--address/--worker-*, or None to work in this process."""
    check_workers(args)
    return spec_from_args(args) if wants_ray(args) else None


def executor_from_args(args):
    from ray_merge.execute.ray.driver import RayExecutor

    return RayExecutor(spec_from_args(args), verbose=getattr(args, "verbose", 0))


