"""The CMA-ES side of the search: the ``cma`` strategy over the genome's [0, 1] box, ask / tell, and the
state a checkpoint needs to continue exactly where it stopped.

The state is the ``cma`` object itself (pickled) with numpy's and Python's global RNG states: ``cma``
draws its samples from numpy's global generator, so both are saved after every ``ask`` and restored on
resume, and a resumed search proposes the same candidates as an uninterrupted one.
"""
from __future__ import annotations

import random
from typing import Optional

import numpy as np

from evolve.config import SearchConfig
from evolve.genome import Genome
from evolve.scoring import format_exception
from ray_merge.errors import UserError


class Searcher:
    def __init__(self, es):
        self.es = es

    @classmethod
    def start(cls, genome: Genome, search: SearchConfig, source: str, seed: Optional[int] = None,
              popsize: Optional[int] = None, sigma0: Optional[float] = None) -> "Searcher":
        """A new strategy; ``seed``, ``popsize`` and ``sigma0`` override the config's."""
        import cma

        seed = seed if seed is not None else search.seed
        x0 = genome.initial(np.random.default_rng(seed) if search.random_init else None)
        cma_opts = {"bounds": [0.0, 1.0], "seed": (seed % (2**31 - 2)) + 1, "verbose": -9}
        popsize = popsize or search.popsize
        if popsize:
            cma_opts["popsize"] = popsize
        cma_opts.update(search.cma_options)
        np.random.seed(cma_opts["seed"])
        random.seed(seed)
        try:
            es = cma.CMAEvolutionStrategy(list(x0), sigma0 or search.sigma0, cma_opts)
        except Exception as e:  # noqa: BLE001 - bad cma_options
            raise UserError(f"cma rejected the options: {format_exception(e)}", source=source, key="search")
        return cls(es)

    @classmethod
    def restore(cls, state: dict) -> "Searcher":
        """The strategy saved in a checkpoint (see :meth:`state`), with the RNG states it had."""
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
        return cls(state["es"])

    def state(self) -> dict:
        """What a checkpoint keeps of the strategy."""
        return {"es": self.es, "numpy_rng": np.random.get_state(), "python_rng": random.getstate()}

    def ask(self) -> list[np.ndarray]:
        """The next generation, clipped to [0, 1]."""
        return [np.clip(np.asarray(x, dtype=float), 0.0, 1.0) for x in self.es.ask()]

    def tell(self, population: list[np.ndarray], fitness: list[float]) -> None:
        """Fitness: lower is better."""
        self.es.tell([list(x) for x in population], fitness)

    def stop(self) -> dict:
        """cma's stop conditions that are met (empty: go on)."""
        return self.es.stop()
