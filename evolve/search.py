"""The search: CMA-ES (``cma``, ask / tell) over the genome, each generation evaluated in parallel on Ray.

One evaluator actor per GPU (per CPU slot without GPUs); the scheduler keeps ``in_flight`` candidates on
every actor (one scoring, the next one merging), handing each to whichever actor has room. A candidate
whose evaluation fails is retried once on another actor, then recorded as failed with its error and given
a fitness worse than any seen. An actor that dies is replaced.

After every generation the CMA-ES state is checkpointed (the ``cma`` object pickled after the next ``ask``,
with that generation's population and ids and numpy's and Python's RNG states), so ``--resume`` continues a
killed search where it stopped: candidates of the interrupted generation already in history.jsonl are
reused, the others evaluated, and no finished evaluation is lost or repeated.
"""
from __future__ import annotations

import logging
import math
import os
import random
import sys
import tempfile
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from evolve.config import EvolveConfig
from evolve.evaluator import combined_score, format_exception
from evolve.genome import Genome
from evolve.storage import Storage
from ray_merge.errors import UserError
from ray_merge.execute.ray.session import join_ray_cluster

log = logging.getLogger("ray_merge.evolve")
INJECT_ENV = "RAY_MERGE_EVOLVE_INJECT_FAILURE"  # test-only: "ID[:N[:raise|exit]],..." (see evaluator.py)


@dataclass
class Candidate:
    id: str
    generation: int
    index: int
    x: np.ndarray
    recipe: dict
    attempts: list = field(default_factory=list)
    excluded: set = field(default_factory=set)


@dataclass
class RunOptions:
    resume: bool = False
    workers: Optional[int] = None
    address: Optional[str] = None
    verbose: int = 0
    quiet: bool = False
    report: bool = True
    max_fevals: Optional[int] = None
    popsize: Optional[int] = None
    sigma0: Optional[float] = None
    seed: Optional[int] = None


def _say(opts: RunOptions, msg: str) -> None:
    if not opts.quiet:
        print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------
# Ray and the evaluator pool
# --------------------------------------------------------------------------------------------------------
class RaySession:
    """Connects to a cluster (``--address``, or the job's cluster inside ``ray job submit``) or starts a
    local instance on 127.0.0.1; shuts down only what it started."""

    def __init__(self, address: Optional[str], verbose: int, local_cpus: int):
        self.address = address
        self.verbose = verbose
        self.local_cpus = local_cpus
        self.temp_dir: Optional[str] = None
        self.connected_here = False

    def __enter__(self):
        remote = bool(self.address) or bool(os.environ.get("RAY_ADDRESS")) or bool(os.environ.get("RAY_JOB_ID"))
        if not remote and "ray" not in sys.modules:
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            os.environ.setdefault("RAY_AUTH_MODE", "token")
        import ray

        quiet = dict(logging_level=logging.INFO if self.verbose >= 2 else logging.WARNING,
                     log_to_driver=self.verbose >= 1)
        if ray.is_initialized():
            return self
        if remote:
            join_ray_cluster(self.address or os.environ.get("RAY_ADDRESS") or "auto", **quiet)
        else:
            base = os.environ.get("RAY_TMPDIR") or "/tmp"  # Ray's socket paths are limited to ~107 chars
            self.temp_dir = tempfile.mkdtemp(prefix="rm-ev-", dir=base)
            ray.init(address="local", num_cpus=self.local_cpus, _node_ip_address="127.0.0.1",
                     include_dashboard=False, _temp_dir=self.temp_dir, object_store_memory=256 * 2**20,
                     **quiet)
        self.connected_here = True
        return self

    def __exit__(self, exc_type, exc, tb):
        import shutil

        import ray

        if self.connected_here:
            ray.shutdown()
        if self.temp_dir:
            if exc_type is None or issubclass(exc_type, (KeyboardInterrupt, UserError)):
                shutil.rmtree(self.temp_dir, ignore_errors=True)
            else:
                log.warning("Ray logs of this run are in %s", self.temp_dir)
        return False


class EvaluatorPool:
    """``n`` evaluator actors; ``run`` evaluates candidates with ``in_flight`` per actor and one retry."""

    def __init__(self, spec: dict, n: int, num_cpus: float, num_gpus: float, in_flight: int,
                 inject: Optional[str], say: Callable[[str], None]):
        self.spec = spec
        self.n = n
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.in_flight = in_flight
        self.inject = inject
        self.say = say
        self.actors: list = []
        self.names: list[str] = []
        self.infos: list[dict] = []
        self.restarts = 0

    def _new_actor(self, name: str):
        import ray

        from evolve.evaluator import Evaluator

        cls = ray.remote(Evaluator)
        return cls.options(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_concurrency=self.in_flight + 1,
                           name=None).remote(self.spec, name, self.inject)

    def start(self) -> None:
        import ray

        self.names = [f"eval-{i}" for i in range(self.n)]
        self.actors = [self._new_actor(name) for name in self.names]
        refs = [a.setup.remote() for a in self.actors]
        try:
            self.infos = ray.get(refs, timeout=float(os.environ.get("RAY_MERGE_EVOLVE_SETUP_TIMEOUT", 900)))
        except ray.exceptions.GetTimeoutError:
            raise UserError(f"evaluators did not start within the timeout: does the cluster have "
                            f"{self.n} x (CPU {self.num_cpus}, GPU {self.num_gpus}) free?")
        except Exception as e:  # noqa: BLE001 - a setup error: one line, no traceback
            raise UserError(f"an evaluator failed to start: {format_exception(e)}", source=self.spec["source"])

    def _replace(self, i: int) -> None:
        import ray

        self.restarts += 1
        name = f"{self.names[i].split('~')[0]}~{self.restarts}"
        self.say(f"evaluator {self.names[i]} died; starting {name}")
        try:
            ray.kill(self.actors[i])
        except Exception:  # noqa: BLE001
            pass
        self.names[i] = name
        self.actors[i] = self._new_actor(name)
        try:
            self.infos[i] = ray.get(self.actors[i].setup.remote())
        except Exception as e:  # noqa: BLE001
            raise UserError(f"a replacement evaluator failed to start: {format_exception(e)}",
                            source=self.spec["source"])

    def run(self, cands: list[Candidate], on_done: Callable[[Candidate, Optional[dict], Optional[str]], None]):
        """Evaluate ``cands``; ``on_done(candidate, result or None, error or None)`` as each finishes."""
        import ray

        queue = deque(cands)
        inflight: dict = {}  # ref -> (candidate, actor index)
        load = [0] * len(self.actors)
        t_submit: dict[str, float] = {}

        def pick(c: Candidate) -> Optional[int]:
            free = [i for i in range(len(self.actors)) if load[i] < self.in_flight]
            allowed = [i for i in free if self.names[i] not in c.excluded] if len(self.actors) > 1 else free
            if not allowed:
                return None
            return min(allowed, key=lambda i: (load[i], i))

        while queue or inflight:
            for _ in range(len(queue)):
                c = queue.popleft()
                i = pick(c)
                if i is None:
                    queue.append(c)
                    continue
                ref = self.actors[i].evaluate.remote(c.id, c.recipe, len(c.attempts) + 1)
                inflight[ref] = (c, i)
                load[i] += 1
                t_submit[c.id] = time.time()
            if not inflight:
                continue
            done, _ = ray.wait(list(inflight), num_returns=1)
            ref = done[0]
            c, i = inflight.pop(ref)
            load[i] -= 1
            worker = self.names[i]
            try:
                res = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                err = f"evaluator {worker} died: {format_exception(e)}"
                # everything in flight on that actor is lost with it: requeue it too
                lost = [(r, ci) for r, (ci, ai) in inflight.items() if ai == i]
                for r, ci in lost:
                    inflight.pop(r)
                    queue.appendleft(ci)
                load[i] = 0
                self._replace(i)
                self._failed(c, worker, err, queue, on_done)
                continue
            except Exception as e:  # noqa: BLE001 - a RayTaskError: the evaluation raised
                self._failed(c, worker, format_exception(e), queue, on_done)
                continue
            res["timings"]["queue_s"] = res["timings"]["start"] - t_submit[c.id]
            c.attempts.append({"worker": worker, "error": None, **res["timings"]})
            on_done(c, res, None)

    def _failed(self, c: Candidate, worker: str, err: str, queue: deque, on_done) -> None:
        c.attempts.append({"worker": worker, "error": err})
        c.excluded.add(worker)
        if len(c.attempts) < 2:
            self.say(f"candidate {c.id} failed on {worker} ({err}); retrying on another evaluator")
            queue.appendleft(c)
        else:
            self.say(f"candidate {c.id} failed twice; recorded as failed ({err})")
            on_done(c, None, err)

    def stats(self) -> list[dict]:
        import ray

        try:
            return ray.get([a.stats.remote() for a in self.actors], timeout=30)
        except Exception:  # noqa: BLE001
            return []

    def close(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.get(a.close.remote(), timeout=30)
            except Exception:  # noqa: BLE001
                pass
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001
                pass


def _cluster_workers(ev, workers: Optional[int]) -> tuple[int, float, float]:
    """(number of evaluators, CPUs and GPUs per evaluator) for the connected cluster."""
    import ray

    res = ray.cluster_resources()
    gpus = float(res.get("GPU", 0))
    cpus = float(res.get("CPU", 1))
    num_gpus = ev.num_gpus if ev.num_gpus is not None else (1.0 if gpus > 0 else 0.0)
    if workers is None:
        workers = int(gpus // num_gpus) if num_gpus > 0 else int(cpus // ev.num_cpus)
    return max(1, workers), ev.num_cpus, num_gpus


# --------------------------------------------------------------------------------------------------------
# CMA-ES
# --------------------------------------------------------------------------------------------------------
def new_es(genome: Genome, cfg: EvolveConfig, opts: RunOptions):
    import cma

    s = cfg.search
    seed = opts.seed if opts.seed is not None else s.seed
    x0 = genome.initial(np.random.default_rng(seed) if s.random_init else None)
    cma_opts = {"bounds": [0.0, 1.0], "seed": (seed % (2**31 - 2)) + 1, "verbose": -9}
    popsize = opts.popsize or s.popsize
    if popsize:
        cma_opts["popsize"] = popsize
    cma_opts.update(s.cma_options)
    np.random.seed(cma_opts["seed"])
    random.seed(seed)
    sigma0 = opts.sigma0 or s.sigma0
    try:
        es = cma.CMAEvolutionStrategy(list(x0), sigma0, cma_opts)
    except Exception as e:  # noqa: BLE001 - bad cma_options
        raise UserError(f"cma rejected the options: {format_exception(e)}", source=cfg.source, key="search")
    return es


def _ids(generation: int, n: int) -> list[str]:
    return [f"g{generation:03d}-{i:02d}" for i in range(n)]


def run_search(cfg: EvolveConfig, storage_path: str, opts: RunOptions) -> dict:
    """Run (or resume) the search. Returns the summary dict the report prints."""
    storage = Storage(storage_path)
    storage.start(cfg, resume=opts.resume)
    genome = Genome.from_config(cfg.genome, cfg.source)
    if genome.dim == 1:
        raise UserError("the genome has one gene; CMA-ES needs at least two (add a filter, a layer group or a "
                        "parameter)", source=cfg.source, key="genome")
    say = lambda m: _say(opts, m)  # noqa: E731
    max_fevals = opts.max_fevals or cfg.search.max_fevals
    session = uuid.uuid4().hex[:8]

    # The first recipe is planned here: a recipe the planner rejects fails now, with one line.
    first_recipe = genome.to_recipe(genome.initial())
    from ray_merge.planner.plan import plan_recipe
    from ray_merge.recipe.load import recipe_from_dict

    plan_recipe(recipe_from_dict(first_recipe, source=f"{cfg.source} (genome -> recipe)"), seed=cfg.seed)

    history = storage.read_history() if opts.resume else []
    done_by_id = {r["id"]: r for r in history}
    state = storage.load_checkpoint() if opts.resume else None
    if state is None:
        es = new_es(genome, cfg, opts)
        generation = 0
        population = None
    else:
        es = state["es"]
        generation = state["generation"]
        population = [np.asarray(x) for x in state["population"]] if state.get("population") is not None else None
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
        say(f"resuming at generation {generation}: {len(history)} evaluation(s) in the history")

    def checkpoint(pop, ids):
        storage.save_checkpoint({"es": es, "generation": generation,
                                 "population": [list(map(float, x)) for x in pop] if pop is not None else None,
                                 "ids": ids, "numpy_rng": np.random.get_state(), "python_rng": random.getstate(),
                                 "fevals": len(done_by_id), "session": session})

    def ask():
        pop = [np.clip(np.asarray(x, dtype=float), 0.0, 1.0) for x in es.ask()]
        return pop

    unsaved = False  # a new generation is checkpointed once the evaluators are up (a failed start leaves none)
    if population is None and len(done_by_id) < max_fevals and not es.stop():
        population = ask()
        unsaved = True

    best = None
    for r in history:
        if r.get("status") == "ok" and (best is None or r["score"] > best["score"]):
            best = r

    ev = cfg.evaluation
    spec = {"evaluation": {**ev.__dict__}, "tasks": [t.__dict__ for t in cfg.tasks], "seed": cfg.seed,
            "first_recipe": first_recipe, "source": cfg.source}
    inject = os.environ.get(INJECT_ENV)
    local_cpus = max(os.cpu_count() or 1, math.ceil((opts.workers or ev.workers or 1) * ev.num_cpus))
    t_start = time.time()
    summary: dict = {}
    pool = None
    work = population is not None or (ev.score_inputs and bool(_input_candidates(cfg, storage)))
    if not work:
        say(f"nothing left to evaluate in {storage.path}: {len(done_by_id)} evaluation(s) done (raise "
            "--max-fevals to continue the search)")
    else:
        with RaySession(opts.address, opts.verbose, local_cpus):
            n, cpus, gpus = _cluster_workers(ev, opts.workers or ev.workers)
            say(f"{genome.describe()}\nstarting {n} evaluator(s) ({ev.backend} backend, {cpus:g} CPU / "
                f"{gpus:g} GPU each, {ev.in_flight} candidates in flight each)")
            pool = EvaluatorPool(spec, n, cpus, gpus, ev.in_flight, inject, say)
            try:
                pool.start()
                say(f"evaluators ready in {max(i['setup_s'] for i in pool.infos):.1f}s")
                if unsaved:
                    checkpoint(population, _ids(generation, len(population)))
                if ev.score_inputs:
                    _score_inputs(cfg, storage, pool, say)

                def on_done(c: Candidate, res: Optional[dict], err: Optional[str]) -> None:
                    nonlocal best
                    rec = {"id": c.id, "generation": c.generation, "index": c.index, "session": session,
                           "status": "ok" if res else "failed", "genotype": [float(v) for v in c.x],
                           "values": {genome.gene_label(g): v for g, v in genome.values(c.x).items()},
                           "recipe": c.recipe, "scores": res["scores"] if res else None,
                           "score": combined_score(res["scores"], spec["tasks"]) if res else None,
                           "error": err, "attempts": c.attempts, "worker": res["worker"] if res else None,
                           "timings": res["timings"] if res else None, "finished_at": time.time(),
                           "eval_number": len(done_by_id) + 1}
                    rec["fitness"] = -rec["score"] if res else None
                    storage.append_history(rec)
                    done_by_id[c.id] = rec
                    if res and (best is None or rec["score"] > best["score"]):
                        best = rec
                        storage.write_best(rec, len(done_by_id))

                while population is not None:
                    ids = _ids(generation, len(population))
                    cands = []
                    for i, (cid, x) in enumerate(zip(ids, population)):
                        if cid in done_by_id:
                            prev = np.asarray(done_by_id[cid]["genotype"])
                            if prev.shape != x.shape or not np.allclose(prev, x, atol=1e-9):
                                raise UserError(f"history.jsonl holds candidate {cid} with another genotype than "
                                                "the checkpoint: the storage directory is inconsistent",
                                                source=storage.path)
                            continue
                        cands.append(Candidate(cid, generation, i, x, genome.to_recipe(x)))
                    t_gen = time.time()
                    if cands:
                        pool.run(cands, on_done)
                    recs = [done_by_id[cid] for cid in ids]
                    ok = [r for r in recs if r["status"] == "ok"]
                    if not ok and best is None:
                        raise UserError(f"every candidate of generation {generation} failed: {recs[0]['error']}",
                                        source=cfg.source)
                    worst = max([r["fitness"] for r in done_by_id.values() if r["status"] == "ok"])
                    fitness = [r["fitness"] if r["status"] == "ok" else worst + 1.0 for r in recs]
                    es.tell([list(x) for x in population], fitness)
                    scores = [r["score"] for r in ok]
                    top = max(scores, default=float("nan"))
                    say(f"generation {generation}: {len(ok)}/{len(recs)} ok, best {top:.4f}"
                        f" mean {np.mean(scores) if scores else float('nan'):.4f}; best so far {best['score']:.4f} "
                        f"({best['id']}); {len(done_by_id)}/{max_fevals} evaluations; {time.time() - t_gen:.1f}s")
                    generation += 1
                    stop = es.stop()
                    if len(done_by_id) >= max_fevals or stop:
                        population = None
                        summary["stop_reason"] = ("max_fevals" if len(done_by_id) >= max_fevals
                                                  else ", ".join(f"{k}" for k in stop))
                    else:
                        population = ask()
                    checkpoint(population, _ids(generation, len(population)) if population is not None else None)
                summary["worker_stats"] = pool.stats()
                summary["workers"] = pool.infos
                summary["restarts"] = pool.restarts
            finally:
                pool.close()
    summary.setdefault("stop_reason", "max_fevals" if len(done_by_id) >= max_fevals else "already finished")
    summary["session_s"] = time.time() - t_start
    summary["session"] = session
    if opts.report:
        from evolve.report import write_report

        text = write_report(storage, genome, cfg, summary)
        if not opts.quiet:
            print(text)
    return summary


def _input_candidates(cfg: EvolveConfig, storage: Storage) -> list[Candidate]:
    """The input models not scored yet, each as a passthrough recipe (scored like the candidates)."""
    have = {r["id"] for r in storage.read_inputs()}
    models = list(cfg.genome.models)
    if cfg.genome.base_model and cfg.genome.base_model not in models:
        models.insert(0, cfg.genome.base_model)
    cands = []
    names = [os.path.basename(m.rstrip("/")) or m for m in models]
    for i, m in enumerate(models):
        cid = f"input:{names[i]}" if names.count(names[i]) == 1 else f"input:{names[i]}-{i}"
        if cid in have:
            continue
        recipe = {"merge_method": "passthrough", "models": [{"model": m}]}
        for key in ("tokenizer_source", "tokenizer", "chat_template"):
            v = getattr(cfg.genome, key)
            if v is not None:
                recipe[key] = v
        cands.append(Candidate(cid, -1, len(cands), np.zeros(0), recipe))
    return cands


def _score_inputs(cfg: EvolveConfig, storage: Storage, pool: EvaluatorPool, say) -> list[dict]:
    """Score each input model once."""
    have = {r["id"]: r for r in storage.read_inputs()}
    cands = _input_candidates(cfg, storage)
    tasks = [t.__dict__ for t in cfg.tasks]

    def on_done(c: Candidate, res: Optional[dict], err: Optional[str]) -> None:
        rec = {"id": c.id, "model": c.recipe["models"][0]["model"], "status": "ok" if res else "failed",
               "scores": res["scores"] if res else None,
               "score": combined_score(res["scores"], tasks) if res else None, "error": err}
        storage.append_input(rec)
        have[c.id] = rec
        if res:
            say(f"input {c.id[6:]}: score {rec['score']:.4f} "
                f"({', '.join(f'{k} {v:.3f}' for k, v in res['scores'].items())})")

    if cands:
        pool.run(cands, on_done)
    return list(have.values())
