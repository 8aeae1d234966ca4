"""The search: the generation loop. CMA-ES (evolve.searcher) proposes each generation; it is evaluated in
parallel on Ray; every result goes to the history, and the search is checkpointed after every generation.

One evaluator actor per GPU (per CPU slot without GPUs), driven by ray_merge's ``WorkPool``: every actor
holds ``in_flight`` candidates (one scoring, the next one merging). A candidate whose evaluation fails is
retried once on another actor, then recorded as failed with its error and given a fitness worse than any
seen. An actor that dies is replaced; each candidate it held counts a failed attempt (which one killed it
is unknown) and is retried elsewhere.

After every generation the CMA-ES state is checkpointed (the ``cma`` object pickled after the next ``ask``,
with that generation's population and ids and numpy's and Python's RNG states), so ``--resume`` continues a
killed search where it stopped: candidates of the interrupted generation already in history.jsonl are
reused, the others evaluated, and no finished evaluation is lost or repeated.
"""
from __future__ import annotations

import math
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from evolve.config import EvolveConfig
from evolve.evaluator import Evaluator
from evolve.genome import Genome
from evolve.report import write_report
from evolve.scoring import combined_score, format_exception
from evolve.searcher import Searcher
from evolve.storage import Storage
from ray_merge.errors import UserError
from ray_merge.execute.ray.pool import WorkPool
from ray_merge.execute.ray.session import ray_session
from ray_merge.options import WorkerSpec
from ray_merge.planner.plan import plan_recipe
from ray_merge.recipe.load import recipe_from_dict


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
# the evaluator pool
# --------------------------------------------------------------------------------------------------------
class EvaluatorPool:
    """``n`` evaluator actors; ``run`` evaluates candidates with ``in_flight`` per actor and one retry."""

    def __init__(self, spec: dict, n: int, num_cpus: float, num_gpus: float, in_flight: int,
                 say: Callable[[str], None], evaluator_cls: type = Evaluator):
        self.spec = spec
        self.n = n
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.in_flight = in_flight
        self.say = say
        self.evaluator_cls = evaluator_cls
        self.pool: Optional[WorkPool] = None
        self.names: list[str] = []
        self.infos: list[dict] = []
        self.restarts = 0
        self._submitted: dict[str, float] = {}  # candidate id -> when it was last handed to an actor

    def _new_actor(self, name: str):
        import ray

        cls = ray.remote(self.evaluator_cls)
        return cls.options(num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                           max_concurrency=self.in_flight + 1).remote(self.spec, name)

    def _submit(self, actor, c: Candidate):
        self._submitted[c.id] = time.time()
        return actor.evaluate.remote(c.id, c.recipe)

    def start(self) -> None:
        import ray

        self.names = [f"eval-{i}" for i in range(self.n)]
        self.pool = WorkPool([self._new_actor(name) for name in self.names], self._submit, slots=self.in_flight)
        refs = [a.setup.remote() for a in self.pool.actors]
        try:
            self.infos = ray.get(refs, timeout=float(os.environ.get("RAY_MERGE_EVOLVE_SETUP_TIMEOUT", 900)))
        except ray.exceptions.GetTimeoutError:
            raise UserError(f"evaluators did not start within the timeout: does the cluster have "
                            f"{self.n} x (CPU {self.num_cpus}, GPU {self.num_gpus}) free?")
        except Exception as e:  # noqa: BLE001 - a setup error: one line, no traceback
            raise UserError(f"an evaluator failed to start: {format_exception(e)}", source=self.spec["source"])

    def _replace(self, i: int) -> list[Candidate]:
        """A new actor in place of dead actor ``i``; returns the candidates the dead one still held."""
        import ray

        self.restarts += 1
        name = f"{self.names[i].split('~')[0]}~{self.restarts}"
        self.say(f"evaluator {self.names[i]} died; starting {name}")
        try:
            ray.kill(self.pool.actors[i])
        except Exception:  # noqa: BLE001
            pass
        self.names[i] = name
        actor = self._new_actor(name)
        lost = self.pool.replace(i, actor)
        try:
            self.infos[i] = ray.get(actor.setup.remote())
        except Exception as e:  # noqa: BLE001
            raise UserError(f"a replacement evaluator failed to start: {format_exception(e)}",
                            source=self.spec["source"])
        return lost

    def run(self, cands: list[Candidate], on_done: Callable[[Candidate, Optional[dict], Optional[str]], None]):
        """Evaluate ``cands``; ``on_done(candidate, result or None, error or None)`` as each finishes."""
        queue = list(cands)

        def next_item(i: int) -> Optional[Candidate]:
            # The pool fills one actor after the other: an actor takes no more than its share of what is in
            # flight and queued, so a short queue is spread over the actors.
            live = self.pool.live()
            share = math.ceil((sum(self.pool.load(j) for j in live) + len(queue)) / len(live))
            if self.pool.load(i) >= share:
                return None
            for c in queue:  # a retried candidate goes to another actor than the one it failed on
                if len(self.names) == 1 or self.names[i] not in c.excluded:
                    queue.remove(c)
                    return c
            return None

        died = ""
        for out in self.pool.outcomes(next_item):
            worker = self.names[out.actor]
            if out.kind == "result":
                c, res = out.item, out.value
                res["timings"]["queue_s"] = res["timings"]["start"] - self._submitted[c.id]
                c.attempts.append({"worker": worker, "error": None, **res["timings"]})
                on_done(c, res, None)
            elif out.kind == "error":  # the evaluation raised
                self._failed(out.item, worker, format_exception(out.error), queue, on_done)
            elif out.kind == "died":  # reported for one of the candidates the actor held; the pool drops the others
                died = f"evaluator {worker} died: {format_exception(out.error)}"
                self._failed(out.item, worker, died, queue, on_done)
            elif out.kind == "actor_gone":
                # which of its candidates killed it is unknown: each one it held counts the failed attempt
                for c in self._replace(out.actor):
                    self._failed(c, worker, died, queue, on_done)

    def _failed(self, c: Candidate, worker: str, err: str, queue: list, on_done) -> None:
        c.attempts.append({"worker": worker, "error": err})
        c.excluded.add(worker)
        if len(c.attempts) < 2:
            self.say(f"candidate {c.id} failed on {worker} ({err}); retrying on another evaluator")
            queue.insert(0, c)
        else:
            self.say(f"candidate {c.id} failed twice; recorded as failed ({err})")
            on_done(c, None, err)

    def stats(self) -> list[dict]:
        import ray

        try:
            return ray.get([a.stats.remote() for a in self.pool.actors], timeout=30)
        except Exception:  # noqa: BLE001
            return []

    def close(self) -> None:
        import ray

        for a in self.pool.actors if self.pool else []:
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
# the generation loop
# --------------------------------------------------------------------------------------------------------
def _ids(generation: int, n: int) -> list[str]:
    return [f"g{generation:03d}-{i:02d}" for i in range(n)]


def run_search(cfg: EvolveConfig, storage_path: str, opts: RunOptions, evaluator_cls: type = Evaluator) -> dict:
    """Run (or resume) the search. Returns the summary dict the report prints.

    ``evaluator_cls``: the evaluator actor's class (``Evaluator``, or a subclass of it)."""
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
    plan_recipe(recipe_from_dict(first_recipe, source=f"{cfg.source} (genome -> recipe)"), seed=cfg.seed)

    history = storage.read_history() if opts.resume else []
    done_by_id = {r["id"]: r for r in history}
    state = storage.load_checkpoint() if opts.resume else None
    if state is None:
        searcher = Searcher.start(genome, cfg.search, cfg.source, seed=opts.seed, popsize=opts.popsize,
                                  sigma0=opts.sigma0)
        generation = 0
        population = None
    else:
        searcher = Searcher.restore(state)
        generation = state["generation"]
        population = [np.asarray(x) for x in state["population"]] if state.get("population") is not None else None
        say(f"resuming at generation {generation}: {len(history)} evaluation(s) in the history")

    def checkpoint(pop, ids):
        storage.save_checkpoint({**searcher.state(), "generation": generation,
                                 "population": [list(map(float, x)) for x in pop] if pop is not None else None,
                                 "ids": ids, "fevals": len(done_by_id), "session": session})

    unsaved = False  # a new generation is checkpointed once the evaluators are up (a failed start leaves none)
    if population is None and len(done_by_id) < max_fevals and not searcher.stop():
        population = searcher.ask()
        unsaved = True

    best = None
    for r in history:
        if r.get("status") == "ok" and (best is None or r["score"] > best["score"]):
            best = r

    ev = cfg.evaluation
    spec = {"evaluation": {**ev.__dict__}, "tasks": [t.__dict__ for t in cfg.tasks], "seed": cfg.seed,
            "first_recipe": first_recipe, "source": cfg.source}
    ray_spec = WorkerSpec(workers=opts.workers or ev.workers, address=opts.address, cpus=ev.num_cpus)
    t_start = time.time()
    summary: dict = {}
    pool = None
    work = population is not None or (ev.score_inputs and bool(_input_candidates(cfg, storage)))
    if not work:
        say(f"nothing left to evaluate in {storage.path}: {len(done_by_id)} evaluation(s) done (raise "
            "--max-fevals to continue the search)")
    else:
        with ray_session(ray_spec, opts.verbose):
            n, cpus, gpus = _cluster_workers(ev, opts.workers or ev.workers)
            say(f"{genome.describe()}\nstarting {n} evaluator(s) ({ev.backend} backend, {cpus:g} CPU / "
                f"{gpus:g} GPU each, {ev.in_flight} candidates in flight each)")
            pool = EvaluatorPool(spec, n, cpus, gpus, ev.in_flight, say, evaluator_cls)
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
                    searcher.tell(population, fitness)
                    scores = [r["score"] for r in ok]
                    top = max(scores, default=float("nan"))
                    say(f"generation {generation}: {len(ok)}/{len(recs)} ok, best {top:.4f}"
                        f" mean {np.mean(scores) if scores else float('nan'):.4f}; best so far {best['score']:.4f} "
                        f"({best['id']}); {len(done_by_id)}/{max_fevals} evaluations; {time.time() - t_gen:.1f}s")
                    generation += 1
                    stop = searcher.stop()
                    if len(done_by_id) >= max_fevals or stop:
                        population = None
                        summary["stop_reason"] = ("max_fevals" if len(done_by_id) >= max_fevals
                                                  else ", ".join(f"{k}" for k in stop))
                    else:
                        population = searcher.ask()
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
