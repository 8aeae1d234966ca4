"""Order statistics in linear time, for magnitude-based sparsification.

mergekit ranks a tensor's elements by sorting all of them (O(n log n)); a merge
only needs the boundary values. Here a k-th smallest value is found with one
radix pass: the top 16 bits of an IEEE float, read as an order-preserving
integer, are counted with ``bincount``; the bin holding rank k is the only one
that needs an exact ``kthvalue``, and it is small (about 1/128 of an octave).

Elements tied with a boundary value are kept or dropped in index order, which is
deterministic but not the (implementation-defined) order mergekit's unstable sort
gives them. ``EXACT_SELECTION_MAX_NUMEL`` sets the size up to which callers use
the same sort mergekit does instead, so small tensors reproduce its choice among
ties exactly; on larger tensors a sort costs 10x more than the selection.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Tensors up to this many elements are ranked with mergekit's own sort.
EXACT_SELECTION_MAX_NUMEL = 1 << 16

_HIST_BITS = 16
_DIRECT_KTHVALUE_NUMEL = 1 << 17


@dataclass(frozen=True)
class OrderStat:
    """The k-th smallest value of a tensor and how many elements lie below it."""

    value: float
    n_less: int  # elements strictly smaller than value
    n_less_equal: int  # elements smaller than or equal to value


def _radix_keys(x: torch.Tensor, nonnegative: bool) -> tuple[torch.Tensor, int]:
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
    magnitude_bits = (1 << (width - 1)) - 1
    keys = torch.bitwise_xor(bits, torch.bitwise_and(sign, magnitude_bits))
    bins = torch.bitwise_right_shift(keys, shift).add_(1 << (_HIST_BITS - 1))
    return bins, 1 << _HIST_BITS


def kth_smallest(x: torch.Tensor, ranks: list[int], nonnegative: bool = False) -> list[OrderStat]:
    """Order statistics of a flat float32/float64 tensor for 1-based ``ranks``.

    Pass ``nonnegative=True`` when every element is >= 0 (e.g. absolute values):
    it skips the sign handling. NaNs are not supported.
    """
    x = x.reshape(-1)
    n = x.numel()
    for k in ranks:
        if not 1 <= k <= n:
            raise ValueError(f"rank {k} out of range for {n} elements")
    if n <= _DIRECT_KTHVALUE_NUMEL:
        out = []
        for k in ranks:
            v = x.kthvalue(k).values
            out.append(OrderStat(float(v), int((x < v).sum()), int((x <= v).sum())))
        return out
    x = x.contiguous()
    bins, n_bins = _radix_keys(x, nonnegative)
    counts = torch.bincount(bins, minlength=n_bins)
    cumulative = counts.cumsum(0)
    out = []
    for k in ranks:
        b = int(torch.searchsorted(cumulative, k))
        below = int(cumulative[b - 1]) if b > 0 else 0
        candidates = x[bins == b]
        v = candidates.kthvalue(k - below).values
        out.append(
            OrderStat(
                float(v),
                below + int((candidates < v).sum()),
                below + int((candidates <= v).sum()),
            )
        )
    return out


def rank_range_mask(x: torch.Tensor, lo: int, hi: int, nonnegative: bool = False) -> torch.Tensor:
    """Boolean mask of the elements whose ascending rank lies in ``[lo, hi)``.

    Ranks are those of a stable sort: equal values are ranked in index order.
    ``x`` is flat float32/float64; the mask has its shape.
    """
    x = x.reshape(-1)
    n = x.numel()
    lo, hi = max(lo, 0), min(hi, n)
    if lo >= hi:
        return torch.zeros(n, dtype=torch.bool)
    if lo == 0 and hi == n:
        return torch.ones(n, dtype=torch.bool)
    wanted = ([lo + 1] if lo > 0 else []) + ([hi] if hi < n else [])
    stats = kth_smallest(x, wanted, nonnegative=nonnegative)
    mask = None
    # For each boundary value: the range of positions, counted among the
    # elements equal to it in index order, that fall inside [lo, hi).
    tie_ranges: dict[float, tuple[OrderStat, int, int]] = {}
    if lo > 0:
        s = stats.pop(0)
        mask = x >= s.value
        tie_ranges[s.value] = (s, lo - s.n_less, s.n_less_equal - s.n_less)
    if hi < n:
        s = stats.pop(0)
        upper = x <= s.value
        mask = upper if mask is None else mask.logical_and_(upper)
        start, stop = 0, hi - s.n_less
        if s.value in tie_ranges:
            _, prev_start, prev_stop = tie_ranges[s.value]
            start, stop = max(start, prev_start), min(stop, prev_stop)
        tie_ranges[s.value] = (s, start, stop)
    for value, (s, start, stop) in tie_ranges.items():
        group = s.n_less_equal - s.n_less
        if start <= 0 and stop >= group:
            continue  # every element equal to the boundary value is inside
        ties = (x == value).nonzero().squeeze(1)
        mask[ties[: max(start, 0)]] = False
        mask[ties[max(stop, 0):]] = False
    return mask


def top_k_mask(x: torch.Tensor, k: int, nonnegative: bool = False) -> torch.Tensor:
    """Mask of the k largest elements of flat ``x`` (ties: lowest indices win)."""
    n = x.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool)
    # The boundary is the k-th largest value; of the elements tied with it,
    # the ones with the lowest indices fill the remaining places.
    stat = kth_smallest(x, [n - k + 1], nonnegative=nonnegative)[0]
    n_greater = n - stat.n_less_equal
    mask = x.reshape(-1) >= stat.value
    extra = (n - stat.n_less) - k  # ties beyond the k we want
    if extra > 0:
        ties = (x.reshape(-1) == stat.value).nonzero().squeeze(1)
        mask[ties[k - n_greater:]] = False
    return mask
