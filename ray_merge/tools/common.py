"""Small helpers shared by the tools (extract-lora, moe, multi).
"""
from __future__ import annotations

import sys


def note(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"ray-merge: note: {msg}", file=sys.stderr)
