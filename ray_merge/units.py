"""Byte counts as people write them (5B, 2GiB) and as we print them.
"""
from __future__ import annotations

import argparse
import math


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def parse_size(value: str) -> int:
    """'5B' (mergekit style: thousand/million/billion), '2GiB', '500MB', '1e9' -> a positive number of bytes."""
    v = str(value).strip()
    units = {
        "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
        "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
        "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12,
    }
    number, scale = v, 1
    low = v.lower()
    for suffix in sorted(units, key=len, reverse=True):
        if low.endswith(suffix):
            number, scale = low[: -len(suffix)].strip(), units[suffix]
            break
    try:
        size = float(number) * scale
    except ValueError:
        size = math.nan
    if not math.isfinite(size) or size < 1:
        raise argparse.ArgumentTypeError(f"not a size: {value!r} (a positive number of bytes: 5B, 2GiB, 500MB)")
    return int(size)
