"""Sparsification of task vectors: which entries of a delta survive.

Each sparsifier looks at one task vector (model - base) and returns a ``Keep``
plan: what to zero, applied later chunk by chunk while the merge streams over
the tensor, and the factor that rescaling asks for. Large task vectors are
never materialised; their chunks are recomputed in cache for each pass.

Rescaling follows mergekit 0.1.5: the kept entries are scaled so that the task
vector's L1 norm is unchanged (skipped when either norm is below 1e-7). For a
random mask this is, in expectation, DARE's 1/density. For a half-precision
recipe the norms and the factor are rounded to that precision, as in mergekit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

from ray_merge.errors import UserError
from ray_merge.methods import _random
from ray_merge.methods._common import round_scalar, work_dtype
from ray_merge.methods._deferred import deferred
from ray_merge.methods._select import CHUNK, RankRange, rank_range, use_mergekit_sort

np = deferred("numpy")
torch = deferred("torch")

MAGNITUDE = "magnitude"
RANDOM = "random"
MAGNITUDE_OUTLIERS = "magnitude_outliers"
DELLA_MAGPRUNE = "della_magprune"
METHODS = (MAGNITUDE, RANDOM, MAGNITUDE_OUTLIERS, DELLA_MAGPRUNE)

_RESCALE_EPS = 1e-7


class TaskVector:
    """``model - base``, computed on demand, chunk by chunk.

    The difference is taken in the inputs' own precision (as mergekit does, so
    a bfloat16 merge ranks exactly the same values) and widened to float32
    (float64 stays).
    """

    def __init__(self, model: torch.Tensor, base: torch.Tensor):
        self.shape = base.shape
        self.model = model.reshape(-1)
        self.base = base.reshape(-1)
        self.numel = self.base.numel()
        self.dtype = work_dtype(base)

    @property
    def native_dtype(self) -> Optional[torch.dtype]:
        """The inputs' shared dtype when it is half precision, else None."""
        d = self.base.dtype
        return d if d in (torch.float16, torch.bfloat16) and self.model.dtype == d else None

    def native_chunk(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """The delta over [start, stop) in ``native_dtype``, exactly the values ``chunk`` widens."""
        return torch.sub(self.model[start:stop], self.base[start:stop], out=out)

    def chunk(self, start: int, stop: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        m, b = self.model[start:stop], self.base[start:stop]
        if m.dtype == self.dtype and b.dtype == self.dtype:
            return torch.sub(m, b) if out is None else torch.sub(m, b, out=out)
        delta = m - b
        return delta.to(self.dtype) if out is None else out.copy_(delta)

    def chunks(self, size: int = CHUNK) -> Iterator[tuple[int, torch.Tensor]]:
        for start in range(0, self.numel, size):
            yield start, self.chunk(start, min(start + size, self.numel))

    def magnitudes(self):
        """``chunks()`` of |delta|, for the order-statistics helpers."""
        return lambda: (d.abs_() for _, d in self.chunks())

    def full(self) -> torch.Tensor:
        return self.chunk(0, self.numel)


@dataclass
class Keep:
    """Which entries of one task vector survive; keeps everything by default."""

    factor: float = 1.0

    def apply_(self, delta: torch.Tensor, start: int) -> None:
        """Zero, in place, the dropped entries of the chunk beginning at ``start``."""


@dataclass
class KeepNone(Keep):
    def apply_(self, delta: torch.Tensor, start: int) -> None:
        delta.zero_()


@dataclass
class KeepMask(Keep):
    mask: torch.Tensor = None  # flat bool, on the CPU

    def apply_(self, delta: torch.Tensor, start: int) -> None:
        zero_dropped_(delta, self.mask[start : start + delta.numel()])


def zero_dropped_(x: torch.Tensor, keep: torch.Tensor) -> None:
    """``x *= keep`` in place for a flat bool ``keep``; dropped entries become +0.0.

    On the CPU this is numpy's multiply by a bool array, about 4x faster than
    torch's (which widens the mask first); half precision goes through an
    integer view of the same bits, as numpy has no bfloat16.
    """
    if x.device.type != "cpu" or not x.is_contiguous():
        x.mul_(keep.to(x.device))
        return
    # an integer view of the same width: multiplying it by a 0/1 mask zeroes a half float's bits
    values = x.view(torch.int16).numpy() if x.dtype in (torch.float16, torch.bfloat16) else x.numpy()
    np.multiply(values, keep.numpy(), out=values)


@dataclass
class KeepRanks(Keep):
    """Keep the entries whose magnitude rank falls in a range (see RankRange)."""

    ranks: RankRange = None

    def apply_(self, delta: torch.Tensor, start: int) -> None:
        delta.mul_(self.ranks.mask(delta.abs(), start))


def _rescaled(keep: Keep, tv: TaskVector, rescale: bool, dtype: torch.dtype) -> Keep:
    """Set ``keep.factor`` to restore the task vector's L1 norm, if asked."""
    if not rescale or isinstance(keep, KeepNone) or type(keep) is Keep:
        return keep

    native = tv.native_dtype
    buffer = torch.empty(min(CHUNK, tv.numel), dtype=native) if native else None
    before = after = 0.0  # summed chunk by chunk, in float64
    for start in range(0, tv.numel, CHUNK):
        stop = min(start + CHUNK, tv.numel)
        if native:  # half-precision deltas are summed in float32 without widening them in memory
            magnitudes = tv.native_chunk(start, stop, out=buffer[: stop - start]).abs_()
        else:
            magnitudes = tv.chunk(start, stop).abs_()
        before += float(torch.sum(magnitudes, dtype=tv.dtype))
        keep.apply_(magnitudes, start)
        after += float(torch.sum(magnitudes, dtype=tv.dtype))
    before, after = round_scalar(before, dtype), round_scalar(after, dtype)
    if before >= _RESCALE_EPS and after >= _RESCALE_EPS:
        keep.factor = round_scalar(before / after, dtype)
    return keep


def _index_mask(n: int, index: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[index] = True
    return mask


def _by_rank(tv: TaskVector, lo: int, hi: int, descending: bool) -> Keep:
    """Keep the entries with magnitude rank in [lo, hi) (ascending ranks)."""
    n = tv.numel
    if use_mergekit_sort(n):
        # mergekit's own ranking, so small tensors agree with it even on ties.
        magnitudes = tv.full().abs_().float()
        if descending:
            order = torch.argsort(magnitudes, descending=True)[n - hi : n - lo]
        else:
            order = torch.sort(magnitudes, descending=False).indices[lo:hi]
        return KeepMask(mask=_index_mask(n, order))
    return KeepRanks(ranks=rank_range(tv.magnitudes(), n, lo, hi, nonnegative=True))


def magnitude(tv: TaskVector, density: float) -> Keep:
    """TIES trimming: keep the ``density`` fraction of entries largest in magnitude
    (at least one, in a non-empty tensor, when density > 0)."""
    if density >= 1:
        return Keep()
    n = tv.numel
    if density <= 0 or n == 0:
        return KeepNone()
    k = max(1, int(density * n))
    return _by_rank(tv, n - k, n, descending=True)


def magnitude_outliers(tv: TaskVector, density: float, gamma: float) -> Keep:
    """Model Breadcrumbs: drop the ``gamma`` fraction of largest entries and enough
    of the smallest that ``density`` of them remain (fewer large ones go when
    ``density + gamma > 1``)."""
    if density >= 1:
        return Keep()
    n = tv.numel
    target = int(density * n)
    n_bottom = max(0, n - target - int(gamma * n))
    if target <= 0 or n == 0:
        return KeepNone()
    return _by_rank(tv, n_bottom, n_bottom + target, descending=False)


def random(tv: TaskVector, density: float, generator: Optional[torch.Generator]) -> Keep:
    """DARE: keep each entry independently with probability ``density``."""
    if density >= 1:
        return Keep()
    return KeepMask(mask=_random.bernoulli_mask(tv.numel, density, _random.draw_seed(generator)))


def della_magprune(
    tv: TaskVector, density: float, epsilon: float, generator: Optional[torch.Generator]
) -> Keep:
    """DELLA MagPrune: keep each entry with a probability that grows with its
    magnitude rank within its row, linearly from ``density - epsilon`` (smallest)
    to ``density + epsilon`` (largest). A 1-D tensor is one row."""
    if density >= 1:
        return Keep()
    if density <= 0:
        return KeepNone()
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise UserError(
            f"della: epsilon must keep density +/- epsilon inside (0, 1); "
            f"got density={density}, epsilon={epsilon}"
        )
    shape = tv.shape if len(tv.shape) >= 2 else (1, tv.numel)
    rows, cols = shape[0], tv.numel // max(shape[0], 1)
    rng = _random.stream(generator)
    mask = torch.empty(tv.numel, dtype=torch.bool)
    block = max(1, CHUNK // max(cols, 1))  # whole rows per step
    for r in range(0, rows, block):
        start, stop = r * cols, min(r + block, rows) * cols
        magnitudes = tv.chunk(start, stop).abs_().view(-1, *shape[1:])
        if shape[1] > 1:
            order = torch.argsort(magnitudes, dim=1)
            ranks_shape = [1, shape[1]] + [1] * (len(shape) - 2)
            ranks = torch.arange(shape[1], dtype=magnitudes.dtype)
            ranks = ranks.view(ranks_shape).expand(order.shape)
            probs = torch.empty_like(magnitudes).scatter_(1, order, ranks)
            probs.mul_(2 * epsilon / (shape[1] - 1)).add_(density - epsilon)
        else:
            probs = torch.full_like(magnitudes, density)
        mask[start:stop] = _random.uniform(stop - start, rng) < probs.reshape(-1)
    return KeepMask(mask=mask)


def plan(
    tv: TaskVector,
    method: str,
    density: float,
    *,
    gamma: float = 0.01,
    epsilon: float = 0.15,
    rescale: bool = False,
    generator: Optional[torch.Generator] = None,
    dtype: Optional[torch.dtype] = None,
) -> Keep:
    """How to sparsify ``tv`` with ``method``; ``dtype`` is the recipe precision."""
    density = float(density)
    if method == MAGNITUDE:
        keep = magnitude(tv, density)
    elif method == RANDOM:
        keep = random(tv, density, generator)
    elif method == MAGNITUDE_OUTLIERS:
        keep = magnitude_outliers(tv, density, float(gamma))
    elif method == DELLA_MAGPRUNE:
        keep = della_magprune(tv, density, float(epsilon), generator)
    else:
        raise ValueError(f"unknown sparsification method {method!r}")
    return _rescaled(keep, tv, rescale, dtype or tv.base.dtype)
