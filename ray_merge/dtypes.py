"""Torch dtypes by the names recipes and safetensors use.
"""
from __future__ import annotations

import torch

DTYPE_BY_NAME = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def itemsize(name: str) -> int:
    return getattr(torch, name).itemsize
