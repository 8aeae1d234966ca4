"""Where tensor work runs: a device name as users write it (auto, cpu, cuda, cuda:N), checked.
"""
from __future__ import annotations

from ray_merge.errors import UserError


def resolve_device(name: str, what: str = "--device") -> str:
    """``name`` checked and made concrete: auto is cuda when CUDA is available, else cpu.

    A device that is not there is a one-line UserError naming ``what`` (the flag or key), before any work."""
    if name == "cpu":
        return name
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"{what} {name}: not a device (use auto, cpu, cuda or cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{what} {name}: no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{what} {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return name
