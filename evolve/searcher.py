"""The search strategies over the genome's [0, 1] box, ask / tell, and the state a checkpoint needs to continue
exactly where it stopped: CMA-ES (``cma``; ``Searcher``) and NSGA-II (``pymoo``; ``NSGA2Searcher``, one
objective per task).

The state holds no object: it is what the strategy was started from (x0, sigma0, cma's options: JSON) and
what it was told since (each generation's fitness), with numpy's RNG state before every ``ask`` (arrays).
``restore`` starts a new strategy from the same x0, sigma0 and options and replays every ask / tell: CMA-ES
is deterministic given its inputs and its random draws, so the replayed strategy is the saved one — mean,
step size, covariance, evolution paths, counters and stop history alike — and nothing in a checkpoint is
ever run as code. A replay that does not end where the saved strategy was (checked on the pending
population, the mean and sigma) is an error, not a different search.

``cma`` draws its samples from numpy's global generator: its state before each ``ask`` and at the time of
the checkpoint is saved (and Python's ``random`` state), so a resumed search proposes the same candidates
as an uninterrupted one.
"""
from __future__ import annotations

import random
from typing import Optional

import numpy as np

from evolve.config import SearchConfig
from evolve.genome import Genome
from evolve.scoring import format_exception
from ray_merge.errors import UserError


def _rng_arrays(states: list) -> dict[str, np.ndarray]:
    """numpy RNG states (``np.random.get_state()`` tuples) as plain arrays."""
    return {"rng_key": np.array([s[1] for s in states], dtype=np.uint32).reshape(len(states), 624),
            "rng_pos": np.array([s[2] for s in states], dtype=np.int64),
            "rng_has_gauss": np.array([s[3] for s in states], dtype=np.int64),
            "rng_cached_gaussian": np.array([s[4] for s in states], dtype=np.float64)}


def _rng_state(arrays: dict, i: int) -> tuple:
    return ("MT19937", np.asarray(arrays["rng_key"][i], dtype=np.uint32), int(arrays["rng_pos"][i]),
            int(arrays["rng_has_gauss"][i]), float(arrays["rng_cached_gaussian"][i]))


class Searcher:
    def __init__(self, es, start: dict):
        self.es = es
        self.start_args = start  # x0, sigma0, options: what the strategy was made from (JSON)
        self.told: list[list[float]] = []  # each generation's fitness, in order
        self.rng_before_ask: list[tuple] = []  # numpy's RNG state before each ask
        self.pending: Optional[list[np.ndarray]] = None  # asked, not told yet

    @staticmethod
    def _make(start: dict):
        import cma

        return cma.CMAEvolutionStrategy(list(start["x0"]), start["sigma0"], dict(start["options"]))

    @classmethod
    def start(cls, genome: Genome, search: SearchConfig, source: str, seed: Optional[int] = None,
              popsize: Optional[int] = None, sigma0: Optional[float] = None) -> "Searcher":
        """A new strategy; ``seed``, ``popsize`` and ``sigma0`` override the config's."""
        seed = seed if seed is not None else search.seed
        x0 = genome.initial(np.random.default_rng(seed) if search.random_init else None)
        cma_opts = {"bounds": [0.0, 1.0], "seed": (seed % (2**31 - 2)) + 1, "verbose": -9}
        popsize = popsize or search.popsize
        if popsize:
            cma_opts["popsize"] = popsize
        cma_opts.update(search.cma_options)
        start = {"x0": [float(v) for v in x0], "sigma0": float(sigma0 or search.sigma0), "options": cma_opts,
                 "python_seed": seed}
        np.random.seed(cma_opts["seed"])
        random.seed(seed)
        try:
            es = cls._make(start)
        except Exception as e:  # noqa: BLE001 - bad cma_options
            raise UserError(f"cma rejected the options: {format_exception(e)}", source=source, key="search")
        return cls(es, start)

    @classmethod
    def restore(cls, meta: dict, arrays: dict, source: str, config_options: Optional[dict] = None) -> "Searcher":
        """The strategy saved by :meth:`state`, rebuilt by replaying its asks and tells.

        cma evaluates options given as text (``"4 + 3 * np.log(N)"``): such an option is taken only when the
        search config (``config_options``: its ``search.cma_options``) gives the same text, never from the
        checkpoint alone. Raises a UserError when the saved numbers are inconsistent or the replay ends
        elsewhere."""
        def bad(msg: str) -> UserError:
            return UserError(f"the checkpoint cannot be replayed: {msg}", source=source)

        try:
            saved = meta["start"]
            options = dict(saved["options"])
            for key, value in options.items():
                if _has_text(value) and (config_options or {}).get(key) != value:
                    raise ValueError(f"option {key!r} holds text that is not in the config's search.cma_options")
            start = {"x0": [float(v) for v in saved["x0"]], "sigma0": float(saved["sigma0"]),
                     "options": dict(options, seed=int(options["seed"]))}
            fitness = [[float(f) for f in row] for row in meta["told"]]
            n_asks = len(arrays["rng_pos"]) - 1  # the last state is the one at checkpoint time
            pending = meta.get("pending")
            if n_asks != len(fitness) + (pending is not None):
                raise ValueError(f"{n_asks} asks for {len(fitness)} tells")
            np.random.seed(start["options"]["seed"])
            es = cls._make(start)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever a damaged file holds
            raise bad(format_exception(e))
        self = cls(es, start)
        try:
            for g in range(n_asks):
                population = self.ask(rng_state=_rng_state(arrays, g))
                if g < len(fitness):
                    if len(fitness[g]) != len(population):
                        raise ValueError(f"generation {g}: {len(fitness[g])} fitness values for "
                                         f"{len(population)} candidates")
                    self.tell(population, fitness[g])
        except Exception as e:  # noqa: BLE001
            raise bad(format_exception(e))
        if pending is not None:
            saved = np.asarray(pending, dtype=float)
            if saved.shape != np.shape(self.pending) or not np.allclose(saved, self.pending, rtol=0, atol=1e-9):
                raise bad("the replayed generation differs from the saved one (another cma or numpy version?)")
        check = meta.get("check") or {}
        if "sigma" in check and not np.isclose(float(self.es.sigma), check["sigma"], rtol=1e-9, atol=0):
            raise bad(f"sigma {self.es.sigma!r} after the replay, {check['sigma']!r} saved")
        if "mean" in check and not np.allclose(np.asarray(self.es.mean, dtype=float), check["mean"], rtol=0,
                                               atol=1e-9):
            raise bad("the replayed mean differs from the saved one")
        np.random.set_state(_rng_state(arrays, n_asks))
        py = meta.get("python_rng")
        if py is not None:
            random.setstate((py[0], tuple(py[1]), py[2]))
        return self

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """What a checkpoint keeps of the strategy: (JSON-able metadata, numeric arrays)."""
        py = random.getstate()
        meta = {"cma_version": _cma_version(), "start": self.start_args, "told": self.told,
                "pending": None if self.pending is None else [[float(v) for v in x] for x in self.pending],
                "check": {"sigma": float(self.es.sigma), "mean": [float(v) for v in self.es.mean]},
                "python_rng": [py[0], list(py[1]), py[2]]}
        return meta, _rng_arrays(self.rng_before_ask + [np.random.get_state()])

    def ask(self, rng_state: Optional[tuple] = None) -> list[np.ndarray]:
        """The next generation, clipped to [0, 1] (``rng_state``: numpy's state to draw it from: a replay)."""
        if rng_state is not None:
            np.random.set_state(rng_state)
        self.rng_before_ask.append(np.random.get_state())
        self.pending = [np.clip(np.asarray(x, dtype=float), 0.0, 1.0) for x in self.es.ask()]
        return self.pending

    def tell(self, population: list[np.ndarray], fitness: list[float]) -> None:
        """Fitness: lower is better."""
        self.es.tell([list(x) for x in population], fitness)
        self.told.append([float(f) for f in fitness])
        self.pending = None

    def stop(self) -> dict:
        """cma's stop conditions that are met (empty: go on)."""
        return self.es.stop()

    @property
    def dim(self) -> int:
        return int(self.es.N)


def _has_text(value) -> bool:
    if isinstance(value, str):
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_text(v) for v in value)
    return isinstance(value, dict)  # no cma option is a mapping: refuse what it could hide


def _cma_version() -> str:
    import cma

    return str(getattr(cma, "__version__", "?"))


# --------------------------------------------------------------------------------------------------------
# NSGA-II (pymoo)
# --------------------------------------------------------------------------------------------------------
def default_popsize(dim: int) -> int:
    """cma's default population size, 4 + 3 ln(dimension), for NSGA-II too."""
    return 4 + int(3 * np.log(max(1, dim)))


class NSGA2Searcher:
    """NSGA-II over the genome's box, one objective per task (minimised: the search tells it the negated
    weighted task scores), through pymoo's ask / tell.

    The checkpoint holds, as for CMA-ES, only numbers: the initial population, the population size and the
    seed, and every generation's objective values. pymoo draws from its own numpy Generator, seeded at
    set-up: ``restore`` builds a new NSGA2 from the same start and replays every ask / tell, which gives the
    same population, pending offspring and generator state — checked against the saved ones."""

    strategy = "nsga2"

    def __init__(self, algorithm, problem, start: dict):
        self.algorithm = algorithm
        self.problem = problem
        self.start_args = start  # dim, n_obj, popsize, seed, initial population (JSON)
        self.told: list[list[list[float]]] = []  # each generation's objective vectors, in order
        self.pending: Optional[list[np.ndarray]] = None
        self._pending_pop = None
        self.exhausted = False  # pymoo could propose no new (non-duplicate) candidate

    @staticmethod
    def _make(start: dict):
        from pymoo.algorithms.moo.nsga2 import NSGA2
        from pymoo.core.problem import Problem
        from pymoo.core.termination import NoTermination

        problem = Problem(n_var=int(start["dim"]), n_obj=int(start["n_obj"]), xl=0.0, xu=1.0)
        algorithm = NSGA2(pop_size=int(start["popsize"]), sampling=np.asarray(start["initial"], dtype=float),
                          eliminate_duplicates=True)
        algorithm.setup(problem, termination=NoTermination(), seed=int(start["seed"]), verbose=False)
        return algorithm, problem

    @classmethod
    def start(cls, genome: Genome, search: SearchConfig, n_obj: int, seed: Optional[int] = None,
              popsize: Optional[int] = None) -> "NSGA2Searcher":
        """A new search: the genome's initial point and ``popsize - 1`` uniform points form the first
        generation."""
        seed = seed if seed is not None else search.seed
        popsize = popsize or search.popsize or default_popsize(genome.dim)
        rng = np.random.default_rng(seed % 2**32)
        x0 = genome.initial(rng if search.random_init else None)
        initial = np.vstack([np.clip(np.asarray(x0, dtype=float), 0.0, 1.0)[None, :],
                             rng.uniform(size=(popsize - 1, genome.dim))])
        start = {"dim": int(genome.dim), "n_obj": int(n_obj), "popsize": int(popsize), "seed": int(seed % 2**32),
                 "initial": [[float(v) for v in row] for row in initial]}
        return cls(*cls._make(start), start)

    @classmethod
    def restore(cls, meta: dict, arrays: dict, source: str) -> "NSGA2Searcher":
        """The search saved by :meth:`state`, rebuilt by replaying its asks and tells (a UserError when the
        saved numbers are inconsistent or the replay ends elsewhere)."""
        def bad(msg: str) -> UserError:
            return UserError(f"the checkpoint cannot be replayed: {msg}", source=source)

        try:
            saved = meta["start"]
            start = {"dim": int(saved["dim"]), "n_obj": int(saved["n_obj"]), "popsize": int(saved["popsize"]),
                     "seed": int(saved["seed"]), "initial": [[float(v) for v in row] for row in saved["initial"]]}
            if np.shape(start["initial"]) != (start["popsize"], start["dim"]):
                raise ValueError("the initial population does not match the population size and genes")
            told = [np.asarray(f, dtype=float) for f in meta["told"]]
            self = cls(*cls._make(start), start)
            for g, f in enumerate(told):
                population = self.ask()
                if f.shape != (len(population), start["n_obj"]):
                    raise ValueError(f"generation {g}: objective values of shape {f.shape} for {len(population)} "
                                     f"candidates and {start['n_obj']} objectives")
                self.tell(population, f.tolist())
            pending = meta.get("pending")
            if pending is not None:
                replayed = self.ask()
                if np.shape(pending) != np.shape(replayed) or not np.allclose(pending, replayed, rtol=0, atol=1e-12):
                    raise ValueError("the replayed generation differs from the saved one (another pymoo or numpy "
                                     "version?)")
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever a damaged file holds
            raise bad(format_exception(e))
        check = meta.get("check") or {}
        if "rng" in check and check["rng"] != self.algorithm.random_state.bit_generator.state:
            raise bad("pymoo's random generator differs from the saved one after the replay")
        if "pop_x" in check:
            pop_x, want = self._population_x(), check["pop_x"]
            same = (pop_x is None and want is None) or (
                pop_x is not None and want is not None and np.shape(pop_x) == np.shape(want)
                and np.allclose(pop_x, want, rtol=0, atol=1e-12))
            if not same:
                raise bad("the replayed population differs from the saved one")
        np.random.set_state(_rng_state(arrays, len(arrays["rng_pos"]) - 1))
        return self

    def _population_x(self) -> Optional[list]:
        pop = self.algorithm.pop if self.algorithm.is_initialized else None
        return None if pop is None else [[float(v) for v in x] for x in pop.get("X")]

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        import pymoo

        meta = {"strategy": self.strategy, "pymoo_version": str(getattr(pymoo, "__version__", "?")),
                "start": self.start_args, "told": self.told,
                "pending": None if self.pending is None else [[float(v) for v in x] for x in self.pending],
                "check": {"rng": self.algorithm.random_state.bit_generator.state, "pop_x": self._population_x()}}
        return meta, _rng_arrays([np.random.get_state()])

    def ask(self) -> list[np.ndarray]:
        """The next generation (empty when pymoo can propose no candidate it has not seen)."""
        pop = self.algorithm.ask()
        xs = [] if pop is None else [np.clip(np.asarray(x, dtype=float), 0.0, 1.0) for x in pop.get("X")]
        self._pending_pop = pop
        self.pending = xs
        self.exhausted = not xs
        return xs

    def tell(self, population: list[np.ndarray], fitness: list) -> None:
        """``fitness``: one objective vector per candidate, lower is better."""
        from pymoo.core.evaluator import Evaluator as PymooEvaluator
        from pymoo.problems.static import StaticProblem

        f = np.asarray(fitness, dtype=float).reshape(len(population), -1)
        pop = self._pending_pop
        PymooEvaluator().eval(StaticProblem(self.problem, F=f), pop)
        self.algorithm.tell(infills=pop)
        self.told.append([[float(v) for v in row] for row in f])
        self.pending = None
        self._pending_pop = None

    def stop(self) -> dict:
        return {"no new candidates (NSGA-II proposed only duplicates)": True} if self.exhausted else {}

    @property
    def dim(self) -> int:
        return int(self.start_args["dim"])
