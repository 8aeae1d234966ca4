"""Random draws for the randomised methods, all derived from one torch.Generator.

A tensor's generator is seeded from (random seed, tensor name) by the planner.
One draw from it seeds fast SFC64 streams (numpy), which supply every random
bit the method uses: the output depends on nothing but that generator, and
random masks cost a fraction of ``torch.rand``. A mask is drawn in blocks, each
from its own stream (seed, block number), so blocks are drawn in parallel and
the result does not depend on the number of threads.
"""
from __future__ import annotations

from typing import Optional

from ray_merge import parallel
from ray_merge.methods._deferred import deferred

np = deferred("numpy")
torch = deferred("torch")


def draw_seed(generator: Optional[torch.Generator]) -> list[int]:
    """One draw from ``generator`` (torch's default if None) to seed streams with."""
    return [int(s) for s in torch.randint(0, 2**62, (2,), generator=generator, dtype=torch.int64)]


def stream(generator: Optional[torch.Generator]) -> np.random.Generator:
    """A random stream seeded by one draw from ``generator``."""
    return np.random.Generator(np.random.SFC64(draw_seed(generator)))


_BLOCK = 1 << 20  # mask elements per stream (a multiple of 4: four 16-bit draws per 64-bit word)


def bernoulli_mask(n: int, p: float, seed: list[int]) -> torch.Tensor:
    """``n`` independent draws that are True with probability ``p`` rounded to a
    multiple of 2**-16; block ``b`` of the mask comes from the stream seeded by
    ``seed + [b]``."""
    # Each element reads 16 random bits as a signed integer, uniform on
    # [-2**15, 2**15): P(bits < threshold) = round(p * 2**16) / 2**16.
    threshold = min(max(round(p * 2**16), 0), 2**16) - 2**15
    if threshold >= 2**15:
        return torch.ones(n, dtype=torch.bool)
    mask = np.empty(n, dtype=bool)

    def block(start: int) -> None:
        size = min(_BLOCK, n - start)
        bits = np.random.SFC64(seed + [start // _BLOCK])
        draws = bits.random_raw(-(-size // 4)).view(np.int16)[:size]
        np.less(draws, threshold, out=mask[start : start + size])  # numpy's compare: 10x torch's

    parallel.map_ordered(block, range(0, n, _BLOCK))
    return torch.from_numpy(mask)


def uniform(n: int, rng: np.random.Generator) -> torch.Tensor:
    """``n`` float32 draws, uniform on [0, 1)."""
    return torch.from_numpy(rng.random(n, dtype=np.float32))
