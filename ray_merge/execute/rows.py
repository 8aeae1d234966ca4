"""The inputs of a planned tensor, whole or a chunk of output rows at a time: read as they are, or, for a
vocabulary tensor, remapped to the output vocabulary (its RowRemap says which input rows each output row
takes). Rows are read through the loader, which reads only the rows asked for.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from ray_merge.execute.loaders import TensorLoader
from ray_merge.planner.plan import PlannedTensor, TensorInput
from ray_merge.planner.vocab import COPY, MEAN, MIN_CHUNK_ROWS, NONE, RowRemap

READ_GAP_ROWS = 8  # rows this close together are read in one range

Chunk = tuple[int, list[torch.Tensor]]  # (first output row, every input's rows)


def tensor_rows(pt: PlannedTensor, loader: TensorLoader) -> "InputRows":
    """How the inputs of ``pt`` are read: as they are, remapped to the output vocabulary, or (a tensor packing
    its blocks as rows) only the blocks it takes."""
    if pt.row_remap is not None:
        return RemappedRows(pt, loader)
    if pt.packed is not None and pt.packed.dim == 0:
        return PackedRows(pt, loader)
    return InputRows(pt, loader)


class InputRows:
    """The inputs of a planned tensor, read as they are."""

    def __init__(self, pt: PlannedTensor, loader: TensorLoader):
        self.pt, self.loader = pt, loader

    def whole(self, memory_budget: Optional[int] = None) -> list[torch.Tensor]:
        """Every input, whole (read as a whole, so no budget applies)."""
        return self.loader.load_all(self.pt)

    def chunks(self, rows: int) -> Iterator[Chunk]:
        """Every input's rows, ``rows`` at a time, in order."""
        n = self.pt.shape[0]
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            yield start, [self.loader.load_rows(i, start, stop) for i in self.pt.inputs]


class PackedRows(InputRows):
    """The inputs of a tensor packing one block of rows per layer: of each input, only the blocks the output
    takes are read (runs of adjacent blocks in one read); the rest of its rows are left unset, and unused."""

    def whole(self, memory_budget: Optional[int] = None) -> list[torch.Tensor]:
        pk = self.pt.packed
        wanted: list[set[int]] = [set() for _ in self.pt.inputs]
        for block in pk.blocks:
            for k, b in zip(block.inputs, block.blocks):
                wanted[k].add(b)
        out = []
        for inp, blocks in zip(self.pt.inputs, wanted):
            t = torch.empty(inp.shape, dtype=getattr(torch, inp.dtype))
            order = sorted(blocks)
            start = 0
            while start < len(order):
                end = start + 1
                while end < len(order) and order[end] == order[end - 1] + 1:
                    end += 1
                lo, hi = order[start] * pk.width, (order[end - 1] + 1) * pk.width
                t[lo:hi] = self.loader.load_rows(inp, lo, hi)
                start = end
            out.append(t)
        return out

    def chunks(self, rows: int) -> Iterator[Chunk]:
        yield 0, self.whole()  # never row-chunked (planner.memory): the blocks are rows


class RemappedRows(InputRows):
    """The inputs of a vocabulary tensor, each model's rows remapped to the output vocabulary.

    Output rows past the vocabulary (``pad_to_multiple_of``) take each model's mean row, so
    chunks come in order: the padding needs the sums of every row before it.
    """

    def __init__(self, pt: PlannedTensor, loader: TensorLoader):
        super().__init__(pt, loader)
        self.rm: RowRemap = pt.row_remap
        self.comp = getattr(torch, self.rm.compute_dtype)
        self._sums: Optional[list[torch.Tensor]] = None

    def whole(self, memory_budget: Optional[int] = None) -> list[torch.Tensor]:
        """Every model's remapped tensor, assembled a chunk at a time within ``memory_budget``."""
        rm = self.rm
        whole = [torch.empty((rm.out_rows, *rm.rest), dtype=self.comp) for _ in self.pt.inputs]
        for a, ins in self.chunks(rm.rows_per_chunk(memory_budget)):
            for w, t in zip(whole, ins):
                w[a:a + t.shape[0]] = t
            del ins
        return whole

    def chunks(self, rows: int) -> Iterator[Chunk]:
        rm = self.rm
        rows = max(1, rows)
        pad = rm.out_rows - rm.n_vocab
        self._sums = [torch.zeros(rm.rest, dtype=torch.float64) for _ in self.pt.inputs] if pad > 0 else None
        for a in range(0, rm.n_vocab, rows):
            yield a, self._per_model(a, min(rm.n_vocab, a + rows), max(rows, MIN_CHUNK_ROWS))
        for a in range(rm.n_vocab, rm.out_rows, rows):
            yield a, self._padding(min(rm.out_rows, a + rows) - a)

    # -- reading ---------------------------------------------------------
    def _fetch(self, inp: TensorInput, rows: torch.Tensor, max_span: int) -> torch.Tensor:
        """Rows (sorted, unique) of one input, in compute dtype, reading nearby rows together."""
        n = rows.numel()
        out = torch.empty((n, *self.rm.rest), dtype=self.comp)
        r = rows.tolist()
        start = 0
        while start < n:
            lo = r[start]
            end = start + 1
            while end < n and r[end] - r[end - 1] <= READ_GAP_ROWS and r[end] - lo < max_span:
                end += 1
            hi = r[end - 1] + 1
            block = self.loader.load_rows(inp, lo, hi)
            if hi - lo == end - start:
                out[start:end] = block
            else:
                out[start:end] = block[rows[start:end] - lo]
            del block
            start = end
        return out

    def _per_model(self, a: int, b: int, max_span: int) -> list[torch.Tensor]:
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
        for j, inp in enumerate(self.pt.inputs):
            want = torch.cat([P[j][own[j]], P[j][is_mean & (P[j] >= 0)], DR[is_copy & (DI == j)]])
            rows = torch.unique(want)  # sorted
            keys.append(rows)
            fetched.append(self._fetch(inp, rows, max_span))

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
        fetched.clear()  # free the rows no chunk kept
        del defaults
        if self._sums is not None:
            for i, t in enumerate(outs):
                self._sums[i] += t.sum(0, dtype=torch.float64)
        return outs

    def _padding(self, n: int) -> list[torch.Tensor]:
        """Rows past the vocabulary (pad_to_multiple_of): each model's mean row."""
        return [(s / self.rm.n_vocab).to(self.comp).expand(n, *self.rm.rest).clone() for s in self._sums]
