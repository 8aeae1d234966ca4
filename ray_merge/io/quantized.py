"""Quantized checkpoints: which formats a model's weights are stored in, and dequantizing them on read.

Two formats are read, both dequantized into plain floating-point tensors that are merged like any other:

- **block-scaled FP8** (``quantization_config.quant_method: fp8``, as DeepSeek-V3 and many FP8 releases ship
  them): each float8 weight ``W`` of shape ``(..., R, C)`` has a ``W_scale_inv`` beside it (``x.weight`` ->
  ``x.weight_scale_inv``) of shape ``(..., ceil(R / bm), ceil(C / bn))`` for ``weight_block_size: [bm, bn]``,
  float32 (or UE8M0 exponents); the value is ``W[r, c] * scale_inv[r // bm, c // bn]``. Without a block size
  the scale is one number for the whole tensor. Activation scales (``input_scale``) are dropped.
- **MXFP4** (``quant_method: mxfp4``, gpt-oss experts): ``x_blocks`` (uint8, ``(E, R, G, 16)``: 32 FP4 e2m1
  values per block, two a byte, the low nibble first) and ``x_scales`` (uint8, ``(E, R, G)``: one E8M0
  exponent per block, bias 127) hold ``x``, of shape ``(E, G * 32, R)`` (the dequantized rows transposed,
  as transformers loads them).

Every other quantized format is refused, naming it, before any tensor is read. The index of a model presents
the dequantized tensors only (name, shape, dtype); their quantized parts and scales are not merge inputs.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ray_merge.errors import UserError

# the quantization_config methods read here; every other one is refused
FP8, MXFP4 = "fp8", "mxfp4"

# how other formats are called in messages, by their quant_method
FORMAT_NAMES = {
    "bitsandbytes": "bitsandbytes", "gptq": "GPTQ", "awq": "AWQ", "compressed-tensors": "compressed-tensors",
    "compressed_tensors": "compressed-tensors", "hqq": "HQQ", "eetq": "EETQ", "torchao": "torchao",
    "fbgemm_fp8": "FBGEMM FP8", "aqlm": "AQLM", "quanto": "quanto", "bitnet": "BitNet", "higgs": "HIGGS",
    "vptq": "VPTQ", "spqr": "SpQR", "fp_quant": "FP-Quant", "auto-round": "AutoRound", "exl2": "EXL2",
}

# tensor-name endings that only quantized checkpoints hold (for checkpoints whose config does not say)
QUANTIZED_NAME_ENDINGS = {
    ".qweight": "GPTQ or AWQ", ".qzeros": "GPTQ or AWQ", ".g_idx": "GPTQ",
    ".SCB": "bitsandbytes 8-bit", ".weight_format": "bitsandbytes 8-bit",
    ".absmax": "bitsandbytes 4-bit", ".quant_map": "bitsandbytes 4-bit",
    ".quant_state.bitsandbytes__nf4": "bitsandbytes 4-bit", ".quant_state.bitsandbytes__fp4": "bitsandbytes 4-bit",
    ".weight_packed": "compressed-tensors", ".W_q": "HQQ",
}

FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E8M0_BIAS = 127
MXFP4_BLOCK_BYTES = 16  # 32 FP4 values a scale

FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

_CHUNK_ELEMENTS = 1 << 22  # dequantize this many values at a time: temporaries stay small


@dataclass(frozen=True)
class Quantized:
    """Where a dequantized tensor comes from: its quantized data and its scales (index entries of the raw
    checkpoint), and how to combine them."""

    format: str  # FP8 or MXFP4
    data_name: str
    data: object  # the raw tensor's TensorMeta
    scale_name: str
    scale: object  # the scales' TensorMeta
    block: Optional[tuple[int, int]] = None  # FP8: rows x columns one scale covers; None: one scale for all


def quantization_format(config: dict, label: str) -> Optional[str]:
    """FP8 or MXFP4 for a checkpoint that is dequantized on read, None for an unquantized one.

    Any other ``quantization_config`` (or ``compression_config``) is refused in one line naming the format.
    """
    qc = _quant_config(config)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise UserError(f"model {label}: config.json's quantization_config is not a JSON object")
    method = str(qc.get("quant_method") or "").lower()
    if not method and (qc.get("load_in_4bit") or qc.get("load_in_8bit")):
        method = "bitsandbytes"
    if method in (FP8, MXFP4):
        return method
    name = FORMAT_NAMES.get(method, method or "unknown")
    if method == "bitsandbytes":
        name += " 4-bit" if qc.get("load_in_4bit") else " 8-bit" if qc.get("load_in_8bit") else ""
    raise UserError(f"model {label}: {name} quantized weights (quant_method {method or None!r}) are not supported; "
                    "only block-scaled FP8 and MXFP4 checkpoints are read (dequantized): give an unquantized version "
                    "of the model")


def _quant_config(config: dict):
    """config.json's quantization_config (or compression_config; or its text model's), None when it has none."""
    qc = config.get("quantization_config")
    if qc is None:
        qc = config.get("compression_config")
    if qc is None and isinstance(config.get("text_config"), dict):
        qc = config["text_config"].get("quantization_config")
    return qc


def _fp8_block(config: dict, label: str) -> Optional[tuple[int, int]]:
    qc = _quant_config(config) or {}
    block = qc.get("weight_block_size")
    if block is None:
        return None
    if (not isinstance(block, list) or len(block) != 2
            or not all(type(b) is int and b > 0 for b in block)):
        raise UserError(f"model {label}: quantization_config.weight_block_size {block!r} is not two positive "
                        "integers")
    return block[0], block[1]


def logical_dtype(config: dict) -> torch.dtype:
    """The dtype dequantized tensors are read in: the model's own (config.json's), else bfloat16."""
    name = config.get("torch_dtype") or config.get("dtype")
    return FLOAT_DTYPES.get(name, torch.bfloat16) if isinstance(name, str) else torch.bfloat16


def dequantized_index(index: dict, config: dict, label: str) -> dict:
    """A model's index (name -> TensorMeta) as merges see it: each quantized tensor replaced by its dequantized
    self (its TensorMeta with the logical shape and dtype, and ``quant`` saying how to read it), its scales and
    other companions gone. Unsupported formats are refused here, before any tensor is read."""
    fmt = quantization_format(config, label)
    for name in index:
        for ending, what in QUANTIZED_NAME_ENDINGS.items():
            if name.endswith(ending):
                raise UserError(f"model {label}: tensor {name} is a {what} quantized weight; {what} checkpoints are "
                                "not supported, only block-scaled FP8 and MXFP4 ones (dequantized): give an "
                                "unquantized version of the model")
    has_fp8_scales = any(name.endswith("_scale_inv") for name in index)
    if fmt == MXFP4:
        return _mxfp4_index(index, logical_dtype(config), label)
    if fmt == FP8 or has_fp8_scales:
        return _fp8_index(index, config, label)
    return index


def _fp8_index(index: dict, config: dict, label: str) -> dict:
    block = _fp8_block(config, label)
    dtype = logical_dtype(config)
    out = {}
    scales = {name.removesuffix("_scale_inv"): name for name in index if name.endswith("_scale_inv")}
    for name, meta in index.items():
        if name.endswith(("_scale_inv", ".input_scale", ".activation_scale")):
            continue
        scale_name = scales.get(name)
        if scale_name is None:
            if meta.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                raise UserError(f"model {label}: tensor {name} is float8 but has no {name}_scale_inv beside it")
            out[name] = meta
            continue
        scale = index[scale_name]
        if meta.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2) or len(meta.shape) < 2:
            raise UserError(f"model {label}: tensor {name} has scales ({scale_name}) but is "
                            f"{str(meta.dtype).removeprefix('torch.')} {list(meta.shape)}, not a float8 matrix")
        b = None  # one scale: for the whole tensor
        if scale.numel != 1:
            b = block or _inferred_block(meta.shape, scale.shape, label)
            rows, cols = meta.shape[-2:]
            want = (*meta.shape[:-2], math.ceil(rows / b[0]), math.ceil(cols / b[1]))
            if tuple(scale.shape) != want:
                raise UserError(f"model {label}: {scale_name} has shape {list(scale.shape)}; {name} "
                                f"{list(meta.shape)} in blocks of {list(b)} needs {list(want)}")
        if scale.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float8_e8m0fnu):
            raise UserError(f"model {label}: {scale_name} has dtype {str(scale.dtype).removeprefix('torch.')}, "
                            "not a floating-point scale")
        out[name] = dataclasses.replace(meta, dtype=dtype, offset=None,
                                        quant=Quantized(FP8, name, meta, scale_name, scale, b))
    orphans = sorted(set(scales) - set(index))
    if orphans:
        raise UserError(f"model {label}: {scales[orphans[0]]} scales a tensor {orphans[0]} the model does not hold")
    return out


def _inferred_block(shape, scale_shape, label: str) -> tuple[int, int]:
    """The block a scale grid covers when config.json does not say (it must tile the weight exactly)."""
    rows, cols = shape[-2:]
    if len(scale_shape) != len(shape) or rows % scale_shape[-2] or cols % scale_shape[-1]:
        raise UserError(f"model {label}: scales of shape {list(scale_shape)} do not tile a weight of shape "
                        f"{list(shape)}, and config.json's quantization_config gives no weight_block_size")
    return rows // scale_shape[-2], cols // scale_shape[-1]


def _mxfp4_index(index: dict, dtype: torch.dtype, label: str) -> dict:
    out = {}
    for name, meta in index.items():
        if name.endswith("_scales") and name.removesuffix("_scales") + "_blocks" in index:
            continue
        if not name.endswith("_blocks"):
            out[name] = meta
            continue
        base = name.removesuffix("_blocks")
        scale_name = base + "_scales"
        scale = index.get(scale_name)
        if scale is None:
            raise UserError(f"model {label}: MXFP4 tensor {name} has no {scale_name} beside it")
        if (meta.dtype != torch.uint8 or len(meta.shape) != 4 or meta.shape[-1] != MXFP4_BLOCK_BYTES
                or scale.dtype != torch.uint8 or tuple(scale.shape) != tuple(meta.shape[:-1])):
            raise UserError(f"model {label}: MXFP4 tensors {name} {list(meta.shape)} and {scale_name} "
                            f"{list(scale.shape)} are not uint8 blocks (E, R, G, {MXFP4_BLOCK_BYTES}) and scales "
                            "(E, R, G)")
        if base in index:
            raise UserError(f"model {label}: holds both {base} and its MXFP4 blocks {name}")
        experts, rows, groups, nbytes = meta.shape
        out[base] = dataclasses.replace(meta, shape=(experts, groups * nbytes * 2, rows), dtype=dtype, offset=None,
                                        quant=Quantized(MXFP4, name, meta, scale_name, scale))
    return out


def read_dequantized(q: Quantized, dtype: torch.dtype, read_raw: Callable, start: Optional[int] = None,
                     stop: Optional[int] = None) -> torch.Tensor:
    """A dequantized tensor, or its rows [start, stop), read with ``read_raw(name, meta, start, stop)`` (rows
    of a raw tensor; None: all of it). Only the scale rows those rows need are read."""
    if start is None:
        data, scale = read_raw(q.data_name, q.data, None, None), read_raw(q.scale_name, q.scale, None, None)
        if q.format == MXFP4:
            return dequantize_mxfp4(data, scale, dtype)
        return dequantize_fp8(data, scale, q.block, dtype)
    stop = min(stop, q.data.shape[0])
    start = min(start, stop)
    data = read_raw(q.data_name, q.data, start, stop)
    if q.format == MXFP4:  # rows are experts, in the blocks and in their scales alike
        return dequantize_mxfp4(data, read_raw(q.scale_name, q.scale, start, stop), dtype)
    if q.block is None:
        return dequantize_fp8(data, read_raw(q.scale_name, q.scale, None, None), None, dtype)
    if len(q.data.shape) > 2:  # rows of a stack of matrices (experts): their scales are the same rows
        return dequantize_fp8(data, read_raw(q.scale_name, q.scale, start, stop), q.block, dtype)
    bm = q.block[0]
    first = start // bm
    scale = read_raw(q.scale_name, q.scale, first, max(first, math.ceil(stop / bm)))
    return dequantize_fp8(data, scale, q.block, dtype, first_row=start - first * bm)


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, block: Optional[tuple[int, int]], dtype: torch.dtype,
                   first_row: int = 0) -> torch.Tensor:
    """``weight * scale_inv`` per block of ``block`` rows x columns (one scale for all when block is None), in
    dtype. ``first_row``: where the weight's first row lies in the first row of scale blocks given."""
    if block is None:
        return (weight.to(torch.float32) * scale.to(torch.float32).reshape(())).to(dtype)
    bm, bn = block
    rows, cols = weight.shape[-2:]
    out = torch.empty(weight.shape, dtype=dtype)
    lead = math.prod(weight.shape[:-2])
    step = max(1, _CHUNK_ELEMENTS // max(1, cols * lead))
    col_scale = torch.arange(cols) // bn
    scale = scale.to(torch.float32)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        row_scale = (torch.arange(r0, r1) + first_row) // bm
        s = scale.index_select(-2, row_scale).index_select(-1, col_scale)
        out[..., r0:r1, :] = (weight[..., r0:r1, :].to(torch.float32) * s).to(dtype)
    return out


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MXFP4 blocks (E, R, G, 16) and scales (E, R, G) -> (E, G * 32, R) in dtype, one expert at a time."""
    lut = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32)
    experts, rows, groups, nbytes = blocks.shape
    out = torch.empty((experts, groups * nbytes * 2, rows), dtype=dtype)
    for e in range(experts):
        b = blocks[e].to(torch.long)
        values = torch.stack((lut[b & 0x0F], lut[b >> 4]), dim=-1).reshape(rows, groups, nbytes * 2)
        values = values * torch.exp2(scales[e].to(torch.float32) - E8M0_BIAS).unsqueeze(-1)
        out[e] = values.reshape(rows, groups * nbytes * 2).T.to(dtype)
    return out


def unquantized_config(config: dict) -> dict:
    """config.json for weights written unquantized: without ``quantization_config`` (transformers would
    otherwise expect quantized weights)."""
    out = {k: v for k, v in config.items() if k not in ("quantization_config", "compression_config")}
    if isinstance(out.get("text_config"), dict) and "quantization_config" in out["text_config"]:
        out["text_config"] = {k: v for k, v in out["text_config"].items() if k != "quantization_config"}
    return out
