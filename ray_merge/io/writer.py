"""Streaming safetensors shard writer.

The safetensors library serialises a whole dict at once, which would hold an entire
5 GB shard in memory. Because the plan knows every tensor's name, shape and dtype
up front, we write the (standard) header first and then stream each tensor's bytes
to its offset, so a shard never has to fit in memory. Files are checked by reading
them back with the safetensors library in the tests.

With an fsspec filesystem (object storage) the file is written through that filesystem's file object (a
multipart upload on S3: one part buffered at a time) straight to its name: an object only appears once the
upload completes, so no temporary name is needed, and an aborted write is discarded.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

import torch
import xxhash

from ray_merge.errors import UserError
from ray_merge.io.storage import storage_error

_ST_DTYPE = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}


def _nbytes(shape, dtype: str) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * getattr(torch, dtype).itemsize


class ShardWriter:
    """Writes one safetensors file whose tensors are declared in advance, in order."""

    def __init__(self, path: str, layout: Iterable[tuple[str, tuple, str]], fs=None):
        self.path = path
        self._fs = fs
        self.tmp_path = path + ".tmp" if fs is None else path
        self._layout = list(layout)
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in self._layout:
            n = _nbytes(shape, dtype)
            header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._expected = [(name, tuple(shape), dtype) for name, shape, dtype in self._layout]
        self._next = 0
        self._hash = xxhash.xxh3_128()  # fast enough to checksum at write speed
        try:
            self._file = open(self.tmp_path, "wb") if fs is None else fs.open(path, "wb")
        except OSError as e:
            raise UserError(f"cannot create: {e.strerror or e}", source=self.tmp_path) from e
        self._emit(len(raw).to_bytes(8, "little") + raw)
        self.total_bytes = 8 + len(raw) + offset

    def _emit(self, data) -> None:
        try:
            self._file.write(data)
        except OSError as e:  # a full disk: name the file (the error itself names none)
            raise UserError(f"cannot write: {e.strerror or e}", source=self.tmp_path) from e
        except Exception as e:  # an object store's own errors (no credentials, endpoint gone)
            if self._fs is None:
                raise
            raise storage_error(self.path, e) from e
        self._hash.update(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp_name, exp_shape, exp_dtype = self._expected[self._next]
        if name != exp_name or tuple(tensor.shape) != exp_shape or str(tensor.dtype) != f"torch.{exp_dtype}":
            raise RuntimeError(
                f"shard writer expected {exp_name} {exp_shape} {exp_dtype}, got {name} "
                f"{tuple(tensor.shape)} {tensor.dtype}"
            )
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            self._emit(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def write_rows(self, name: str, rows: torch.Tensor) -> None:
        """Write the next rows of tensor ``name`` (a tensor merged in row chunks, in order)."""
        exp_name, exp_shape, exp_dtype = self._expected[self._next]
        done = getattr(self, "_rows_done", 0)
        if (name != exp_name or tuple(rows.shape[1:]) != exp_shape[1:] or str(rows.dtype) != f"torch.{exp_dtype}"
                or done + rows.shape[0] > exp_shape[0]):
            raise RuntimeError(
                f"shard writer expected rows {done}.. of {exp_name} {exp_shape} {exp_dtype}, got {name} "
                f"{tuple(rows.shape)} {rows.dtype}"
            )
        t = rows.detach().to("cpu").contiguous()
        if t.numel():
            self._emit(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        done += rows.shape[0]
        if done == exp_shape[0]:
            self._next += 1
            done = 0
        self._rows_done = done

    def close(self) -> str:
        """Finish the file, rename it into place, return its checksum (xxh3-128, hex)."""
        if self._next != len(self._expected):
            raise RuntimeError(f"shard {self.path}: {len(self._expected) - self._next} tensors never written")
        try:
            self._file.close()  # flushes the last buffered bytes (on object storage: completes the upload)
            if self._fs is None:
                os.replace(self.tmp_path, self.path)
        except OSError as e:
            raise UserError(f"cannot write: {e.strerror or e}", source=self.tmp_path) from e
        except Exception as e:
            if self._fs is None:
                raise
            raise storage_error(self.path, e) from e
        return self._hash.hexdigest()

    def abort(self) -> None:
        if self._fs is not None:
            self._discard()
            return
        try:
            self._file.close()
        except OSError:
            pass  # flushing into a full disk fails again; the file goes anyway
        if os.path.exists(self.tmp_path):
            os.remove(self.tmp_path)


    def _discard(self) -> None:
        """Drop an unfinished upload: the object never appears."""
        discard = getattr(self._file, "discard", None)
        try:
            if discard is not None:
                discard()  # S3: aborts the multipart upload
                self._file.closed = True  # nothing left to flush when the file object is collected
            else:
                self._file.close()
                if self._fs.exists(self.path):
                    self._fs.rm(self.path)
        except Exception:
            pass  # the store is unreachable: an unfinished upload is never a visible object anyway


def checksum_file(path: str, chunk: int = 1 << 24, fs=None) -> str:
    """The same checksum ShardWriter returns, computed from a file on disk (or on ``fs``)."""
    h = xxhash.xxh3_128()
    with (open(path, "rb") if fs is None else fs.open(path, "rb", block_size=chunk)) as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
