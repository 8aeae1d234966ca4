"""Random draws for the randomised methods, all derived from one torch.Generator.

A tensor's generator is seeded from (random seed, tensor name) by the planner.
One 64-bit draw from it seeds a fast SFC64 stream (numpy), which supplies every
random bit the method uses: the output depends on nothing but that generator,
and random masks cost a fraction of ``torch.rand``.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch


def stream(generator: Optional[torch.Generator]) -> np.random.Generator:
    """A random stream seeded by one draw from ``generator`` (torch's default if None)."""
    seed = torch.randint(0, 2**62, (2,), generator=generator, dtype=torch.int64)
    return np.random.Generator(np.random.SFC64([int(seed[0]), int(seed[1])]))


_BLOCK = 1 << 20  # elements drawn at a time (even, so blocks split the word stream exactly)


def bernoulli_mask(n: int, p: float, rng: np.random.Generator) -> torch.Tensor:
    """``n`` independent draws that are True with probability ``p`` (to within 2**-32)."""
    # Each element reads 32 random bits as a signed integer, uniform on
    # [-2**31, 2**31): P(word < threshold) = round(p * 2**32) / 2**32.
    threshold = min(max(round(p * 2**32), 0), 2**32) - 2**31
    if threshold >= 2**31:
        return torch.ones(n, dtype=torch.bool)
    mask = torch.empty(n, dtype=torch.bool)
    for start in range(0, n, _BLOCK):
        size = min(_BLOCK, n - start)
        words = rng.bit_generator.random_raw((size + 1) // 2).view(np.int32)[:size]
        torch.lt(torch.from_numpy(words), threshold, out=mask[start : start + size])
    return mask


def uniform(n: int, rng: np.random.Generator) -> torch.Tensor:
    """``n`` float32 draws, uniform on [0, 1)."""
    return torch.from_numpy(rng.random(n, dtype=np.float32))
