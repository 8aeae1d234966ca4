"""Vocabulary tensors remapped to the output tokenizer while streaming: for each chunk of output rows,
read only the input rows it needs and merge them (the plan's RowRemap says which).
"""
from __future__ import annotations

import json
from typing import Optional

import torch

from ray_merge.execute.compute import compute_tensor
from ray_merge.execute.loaders import TensorLoader
from ray_merge.io.models import SAFETENSORS_DTYPES
from ray_merge.planner.vocab import COPY, MEAN, MIN_CHUNK_ROWS, NONE, RowRemap

READ_GAP_ROWS = 8  # rows this close together are read in one range


# ---------------------------------------------------------------------------
# Recipe settings
# ---------------------------------------------------------------------------


class _InputRows:
    """Reads row ranges of one input tensor: ``pread`` for safetensors (only those bytes
    are read; no memory map keeps pages of the whole tensor resident), else the loader."""

    def __init__(self, loader, inp):
        self.loader, self.inp = loader, inp
        self._fh = None
        plain = type(loader).load is TensorLoader.load
        if plain and inp.file.endswith(".safetensors"):
            fh = open(inp.file, "rb")
            try:
                n = int.from_bytes(fh.read(8), "little")
                info = json.loads(fh.read(n))[inp.tensor]
                self.dtype = SAFETENSORS_DTYPES[info["dtype"]]
                self.shape = tuple(info["shape"])
                width = 1
                for d in self.shape[1:]:
                    width *= d
                self.row_bytes = width * self.dtype.itemsize
                self.offset = 8 + n + info["data_offsets"][0]
                self._fh = fh
            except Exception:
                fh.close()
                raise
        self._plain = plain

    def read(self, lo: int, hi: int) -> torch.Tensor:
        if self._fh is not None:
            nbytes = (hi - lo) * self.row_bytes
            buf = torch.empty(nbytes, dtype=torch.uint8)
            self._fh.seek(self.offset + lo * self.row_bytes)
            view = memoryview(buf.numpy())
            got = 0
            while got < nbytes:
                k = self._fh.readinto(view[got:])
                if not k:
                    raise OSError(f"{self.inp.file}: short read of {self.inp.tensor}")
                got += k
            return buf.view(self.dtype).view(hi - lo, *self.shape[1:])
        if self._plain and hasattr(self.loader, "reader"):
            return self.loader.reader(self.inp.model).read_rows(self.inp.tensor, lo, hi)
        return self.loader.load(self.inp)[lo:hi]

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class RemappedRows:
    """One vocabulary tensor, merged from remapped per-model rows, produced in row chunks.

    ``chunks()`` yields (first row, merged rows) in order; ``materialize()`` the whole
    tensor; ``write_to(writer)`` streams it into a ShardWriter.
    """

    def __init__(self, pt, loader, *, seed: Optional[int], device: str = "cpu",
                 memory_budget: Optional[int] = None, rows: Optional[int] = None):
        self.pt, self.loader, self.seed, self.device = pt, loader, seed, device
        self.rm: RowRemap = pt.row_remap
        self.comp = getattr(torch, self.rm.compute_dtype)
        self.rows = max(1, rows) if rows else self.rm.rows_per_chunk(memory_budget)
        self.chunk_count = 0
        self._sums: Optional[list[torch.Tensor]] = None

    # -- reading ---------------------------------------------------------
    def _fetch(self, reader: _InputRows, rows: torch.Tensor) -> torch.Tensor:
        """Rows (sorted, unique) of one input, in compute dtype, reading nearby rows together."""
        n = rows.numel()
        out = torch.empty((n, *self.rm.rest), dtype=self.comp)
        r = rows.tolist()
        max_span = max(self.rows, MIN_CHUNK_ROWS)
        start = 0
        while start < n:
            lo = r[start]
            end = start + 1
            while end < n and r[end] - r[end - 1] <= READ_GAP_ROWS and r[end] - lo < max_span:
                end += 1
            hi = r[end - 1] + 1
            block = reader.read(lo, hi)
            if hi - lo == end - start:
                out[start:end] = block
            else:
                out[start:end] = block[rows[start:end] - lo]
            del block
            start = end
        return out

    def _per_model(self, readers: list[_InputRows], a: int, b: int) -> list[torch.Tensor]:
        """Each input's rows [a, b) of the output vocabulary, defaults filled in."""
        rm = self.rm
        n_in = rm.perm.shape[0]
        P = rm.perm[:, a:b].to(torch.int64)
        F = rm.force[a:b]
        K = rm.kind[a:b]
        DI = rm.def_input[a:b].to(torch.int64)
        DR = rm.def_row[a:b].to(torch.int64)
        own = (P >= 0) & ~F
        is_mean, is_copy = K == MEAN, K == COPY
        keys, fetched = [], []
        for j in range(n_in):
            want = torch.cat([P[j][own[j]], P[j][is_mean & (P[j] >= 0)], DR[is_copy & (DI == j)]])
            rows = torch.unique(want)  # sorted
            keys.append(rows)
            fetched.append(self._fetch(readers[j], rows))

        def take(j: int, rows: torch.Tensor) -> torch.Tensor:
            return fetched[j][torch.searchsorted(keys[j], rows)]

        n = b - a
        defaults = None
        if bool((K != NONE).any()):
            defaults = torch.zeros((n, *rm.rest), dtype=self.comp)
            for j in range(n_in):
                m = is_copy & (DI == j)
                if bool(m.any()):
                    defaults[m] = take(j, DR[m])
            if bool(is_mean.any()):
                idx = is_mean.nonzero().squeeze(1)
                acc = torch.zeros((idx.numel(), *rm.rest), dtype=torch.float32)
                cnt = torch.zeros(idx.numel(), dtype=torch.float32)
                for j in range(n_in):
                    pj = P[j][idx]
                    h = pj >= 0
                    if bool(h.any()):
                        acc[h] += take(j, pj[h]).float()
                        cnt += h
                acc /= cnt.clamp(min=1).view(-1, *([1] * len(rm.rest)))
                defaults[idx] = acc.to(self.comp)
                del acc
        outs = []
        for i in range(n_in):
            if defaults is None and bool(own[i].all()) and torch.equal(keys[i], P[i]):
                t = fetched[i]  # the model's own rows, in order: already the chunk
            else:
                t = defaults.clone() if defaults is not None else torch.zeros((n, *rm.rest), dtype=self.comp)
                o = own[i]
                if bool(o.any()):
                    t[o] = take(i, P[i][o])
            outs.append(t)
        del fetched, defaults
        if self._sums is not None:
            for i, t in enumerate(outs):
                self._sums[i] += t.sum(0, dtype=torch.float64)
        return outs

    def _padding(self, n: int) -> list[torch.Tensor]:
        """Rows past the vocabulary (pad_to_multiple_of): each model's mean row."""
        return [(s / self.rm.n_vocab).to(self.comp).expand(n, *self.rm.rest).clone() for s in self._sums]

    # -- output ----------------------------------------------------------
    def chunks(self):
        rm, pt = self.rm, self.pt
        n_in = rm.perm.shape[0]
        pad = rm.out_rows - rm.n_vocab
        self._sums = [torch.zeros(rm.rest, dtype=torch.float64) for _ in range(n_in)] if pad > 0 else None
        readers = [_InputRows(self.loader, inp) for inp in pt.inputs]
        try:
            if rm.chunked:
                for a in range(0, rm.n_vocab, self.rows):
                    ins = self._per_model(readers, a, min(rm.n_vocab, a + self.rows))
                    out = compute_tensor(pt, ins, self.seed, self.device)
                    del ins
                    self.chunk_count += 1
                    yield a, out
                for a in range(rm.n_vocab, rm.out_rows, self.rows):
                    ins = self._padding(min(rm.out_rows, a + self.rows) - a)
                    self.chunk_count += 1
                    yield a, compute_tensor(pt, ins, self.seed, self.device)
                return
            whole = [torch.empty((rm.out_rows, *rm.rest), dtype=self.comp) for _ in range(n_in)]
            for a in range(0, rm.n_vocab, self.rows):
                b = min(rm.n_vocab, a + self.rows)
                for w, t in zip(whole, self._per_model(readers, a, b)):
                    w[a:b] = t
            if pad > 0:
                for w, t in zip(whole, self._padding(pad)):
                    w[rm.n_vocab:] = t
            self.chunk_count = 1
            out = compute_tensor(pt, whole, self.seed, self.device)
            del whole
            yield 0, out
        finally:
            for r in readers:
                r.close()

    def materialize(self) -> torch.Tensor:
        out = None
        for a, t in self.chunks():
            if out is None:
                if a == 0 and t.shape[0] == self.rm.out_rows:
                    return t
                out = torch.empty((self.rm.out_rows, *t.shape[1:]), dtype=t.dtype)
            out[a:a + t.shape[0]] = t
        return out

    def write_to(self, writer) -> None:
        for a, t in self.chunks():
            writer.write_rows(self.pt.name, a, t)
