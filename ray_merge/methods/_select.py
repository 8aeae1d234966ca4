"""Order statistics in linear time, for magnitude-based sparsification.

mergekit ranks a tensor's elements by sorting all of them (O(n log n)); a merge
only needs the boundary values. Here a k-th smallest value is found with a
radix pass: the top 16 bits of an IEEE float, read as an order-preserving
integer, are counted with ``bincount``; the bin holding rank k is the only one
that needs an exact ``kthvalue``, and it is small (1/128 of an octave).

Values arrive as a stream of chunks (``chunks()`` returns a fresh iterable of
flat float32/float64 tensors each time it is called, in index order), so a task
vector never has to be materialised: each pass recomputes its chunks in cache.

Elements tied with a boundary value are ranked in index order (a stable sort),
which is deterministic but not the implementation-defined order of mergekit's
unstable sort. Up to ``EXACT_SELECTION_MAX_NUMEL`` elements, callers rank with
the same sort mergekit does instead, so small tensors reproduce its choice
among ties exactly; on larger tensors a sort costs 10x more than the selection.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from ray_merge.methods._deferred import deferred

torch = deferred("torch")


# Tensors up to this many elements are ranked with mergekit's own sort. Set
# RAY_MERGE_EXACT_SELECTION_MAX_NUMEL (read at import, so it reaches Ray
# workers through their environment) to trade speed for mergekit's tie order on
# larger tensors too.
EXACT_SELECTION_MAX_NUMEL = int(os.environ.get("RAY_MERGE_EXACT_SELECTION_MAX_NUMEL", 1 << 16))

# Elements per chunk when streaming: a chunk of every input and the temporaries
# fit in the L3 cache, yet each op is large enough that torch spreads it over
# the cores and its per-op overhead is small (measured on the 1B benchmark,
# 2 cores: DARE-TIES 28 s with 32K chunks, 22 s with 128K, 20 s with 256K/512K).
CHUNK = 1 << 18

_HIST_BITS = 16
_DIRECT_KTHVALUE_NUMEL = 1 << 17

Chunks = Callable[[], Iterable["torch.Tensor"]]


def use_mergekit_sort(numel: int) -> bool:
    """Whether to rank a tensor of ``numel`` elements with mergekit's own sort."""
    return numel <= EXACT_SELECTION_MAX_NUMEL


def split(x: torch.Tensor, size: int = CHUNK) -> Chunks:
    """The chunks of a flat tensor, as views."""
    x = x.reshape(-1)
    return lambda: (x[s : s + size] for s in range(0, x.numel(), size))


@dataclass(frozen=True)
class OrderStat:
    """The k-th smallest value of a tensor and how many elements lie below it."""

    value: float
    n_less: int  # elements strictly smaller than value
    n_less_equal: int  # elements smaller than or equal to value


def _radix_bins(x: torch.Tensor, nonnegative: bool) -> tuple[torch.Tensor, int]:
    """Histogram bins (non-negative ints) that order like x, and how many there are."""
    if x.dtype == torch.float32:
        bits, width = x.view(torch.int32), 32
    elif x.dtype == torch.float64:
        bits, width = x.view(torch.int64), 64
    else:
        raise TypeError(f"order statistics need float32 or float64, got {x.dtype}")
    shift = width - _HIST_BITS
    if nonnegative:
        # Non-negative floats already order like their bit patterns.
        return torch.bitwise_right_shift(bits, shift), 1 << (_HIST_BITS - 1)
    # Negative floats order backwards: flip their magnitude bits.
    sign = torch.bitwise_right_shift(bits, width - 1)
    keys = torch.bitwise_xor(bits, torch.bitwise_and(sign, (1 << (width - 1)) - 1))
    return torch.bitwise_right_shift(keys, shift).add_(1 << (_HIST_BITS - 1)), 1 << _HIST_BITS


def _exact(values: torch.Tensor, k: int, below: int = 0) -> OrderStat:
    v = values.kthvalue(k).values
    return OrderStat(float(v), below + int((values < v).sum()), below + int((values <= v).sum()))


def order_stats(
    chunks: Chunks, n: int, ranks: list[int], nonnegative: bool = False
) -> list[OrderStat]:
    """Order statistics for the 1-based ``ranks`` of the ``n`` streamed values.

    Pass ``nonnegative=True`` when every value is >= 0 (e.g. magnitudes): it
    skips the sign handling. NaNs are not supported.
    """
    for k in ranks:
        if not 1 <= k <= n:
            raise ValueError(f"rank {k} out of range for {n} elements")
    if n <= _DIRECT_KTHVALUE_NUMEL:
        values = torch.cat([c.reshape(-1) for c in chunks()])
        return [_exact(values, k) for k in ranks]
    counts = None
    for c in chunks():
        bins, n_bins = _radix_bins(c, nonnegative)
        h = torch.bincount(bins, minlength=n_bins)
        counts = h if counts is None else counts.add_(h)
    cumulative = counts.cumsum(0)
    where = {}  # rank -> (bin, elements in lower bins)
    for k in ranks:
        b = int(torch.searchsorted(cumulative, k))
        where[k] = (b, int(cumulative[b - 1]) if b > 0 else 0)
    wanted = sorted({b for b, _ in where.values()})
    found: dict[int, list[torch.Tensor]] = {b: [] for b in wanted}
    for c in chunks():
        bins, _ = _radix_bins(c, nonnegative)
        for b in wanted:
            found[b].append(c[bins == b])
    candidates = {b: torch.cat(v) for b, v in found.items()}
    out = []
    for k in ranks:
        b, below = where[k]
        out.append(_exact(candidates[b], k - below, below))
    return out


def kth_smallest(x: torch.Tensor, ranks: list[int], nonnegative: bool = False) -> list[OrderStat]:
    """Order statistics of a float32/float64 tensor for 1-based ``ranks``."""
    return order_stats(split(x), x.numel(), ranks, nonnegative)


def nth_index_of(chunks: Chunks, value: float, ordinal: int, n: int) -> int:
    """Flat index of the ``ordinal``-th (0-based) element equal to ``value``, or n."""
    seen = start = 0
    for c in chunks():
        hits = c == value
        count = int(hits.sum())
        if seen + count > ordinal:
            return start + int(hits.nonzero()[ordinal - seen])
        seen += count
        start += c.numel()
    return n


@dataclass(frozen=True)
class RankRange:
    """The elements whose ascending rank (ties in index order) lies in [lo, hi).

    ``lower = (v, cut)`` keeps x > v, and x == v at flat index >= cut;
    ``upper = (v, cut)`` keeps x < v, and x == v at flat index < cut.
    A missing bound keeps everything on that side.
    """

    lower: Optional[tuple[float, int]]
    upper: Optional[tuple[float, int]]
    empty: bool = False

    def mask(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """The selection among ``x``, the chunk of values starting at flat index ``start``."""
        x = x.reshape(-1)
        n = x.numel()
        if self.empty:
            return torch.zeros(n, dtype=torch.bool)
        keep = None
        if self.lower is not None:
            v, cut = self.lower
            keep = x > v
            k = min(max(cut - start, 0), n)
            if k < n:
                keep[k:] |= x[k:] == v
        if self.upper is not None:
            v, cut = self.upper
            below = x < v
            k = min(max(cut - start, 0), n)
            if k > 0:
                below[:k] |= x[:k] == v
            keep = below if keep is None else keep.logical_and_(below)
        return torch.ones(n, dtype=torch.bool) if keep is None else keep


def rank_range(chunks: Chunks, n: int, lo: int, hi: int, nonnegative: bool = False) -> RankRange:
    """Select ascending ranks ``[lo, hi)`` of the ``n`` streamed values."""
    lo, hi = max(lo, 0), min(hi, n)
    if lo >= hi:
        return RankRange(None, None, empty=True)
    wanted = ([lo + 1] if lo > 0 else []) + ([hi] if hi < n else [])
    stats = order_stats(chunks, n, wanted, nonnegative) if wanted else []
    lower = upper = None
    if lo > 0:
        s = stats.pop(0)
        # Ties with v occupy ranks [n_less, n_less_equal); keep those from rank lo on.
        ordinal = lo - s.n_less
        lower = (s.value, 0 if ordinal == 0 else nth_index_of(chunks, s.value, ordinal, n))
    if hi < n:
        s = stats.pop(0)
        # Keep the ties ranked below hi: the first hi - n_less of them.
        ordinal = hi - s.n_less
        group = s.n_less_equal - s.n_less
        upper = (s.value, n if ordinal >= group else nth_index_of(chunks, s.value, ordinal, n))
    return RankRange(lower, upper)


def rank_range_mask(x: torch.Tensor, lo: int, hi: int, nonnegative: bool = False) -> torch.Tensor:
    """Boolean mask of the elements of flat ``x`` with ascending rank in ``[lo, hi)``
    (a stable sort's ranks: equal values rank in index order)."""
    return rank_range(split(x), x.numel(), lo, hi, nonnegative).mask(x)


def top_k_mask(x: torch.Tensor, k: int, nonnegative: bool = False) -> torch.Tensor:
    """Mask of the k largest elements of flat ``x`` (of tied ones, the last in index order)."""
    n = x.numel()
    return rank_range_mask(x, n - k, n, nonnegative)
