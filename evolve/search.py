"""The search: the generation loop. CMA-ES or NSGA-II (``search.strategy``; evolve.searcher) proposes each
generation; it is evaluated in parallel on Ray; every result goes to the history, and the search is
checkpointed after every generation. NSGA-II gets one objective per task; its Pareto front (over every
evaluation) is written after every generation (evolve.pareto).

With ``evaluation.subsample`` (evolve.subsample) each candidate is scored on a draw of each task's examples
fixed by the seed and its generation; the top candidates are re-scored on the full sets every
``rescore_every`` generations and at the end of each session (``rescored.jsonl``, a cache by candidate id),
and ``subsample_agreement.json`` says how well the cheap scores ranked them.

The genome is ``genome.kind``'s: parameter space (evolve.genome) or layer paths (evolve.dataflow). A
candidate's ``recipe`` is what the history and ``best_config.yml`` hold; the evaluators build its
``eval_recipe`` (a layer path padded with identity layers to a fixed depth, so that each evaluator's model,
instantiated once, fits every candidate).

One evaluator actor per GPU (per CPU slot without GPUs), driven by ray_merge's ``WorkPool``: every actor
holds ``in_flight`` candidates (one scoring, the next one merging). A candidate whose evaluation fails is
retried once on another actor, then recorded as failed with its error and given a fitness worse than any
seen. An actor that dies is replaced; each candidate it held counts a failed attempt (which one killed it
is unknown) and is retried elsewhere. A candidate that runs past ``evaluation.timeout_s`` has hung its
actor: the actor is killed and replaced (its other candidates go back to the queue, not counted as failed),
and the candidate is retried once on another actor, then recorded as failed ("timed out after N s"). A
replacement actor starts in the background: nothing waits for it.

After every generation the CMA-ES state is checkpointed (evolve.searcher: numbers only, no pickle), the
report (plots, summary) rewritten and the generation logged to TensorBoard (evolve.tracking), so
``--resume`` continues a killed search where it stopped: candidates of the interrupted generation already in
history.jsonl are reused, the others evaluated, and no finished evaluation is lost or repeated.

The search stops at the end of the generation that reaches ``max_fevals``, passes the session's wall-clock
budget (``search.max_time_s``: resumable), ends ``search.patience`` generations without a better best, or
meets one of cma's own stop conditions.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from evolve.both import BothGenome
from evolve.config import EvolveConfig
from evolve.dataflow import DataflowGenome
from evolve.evaluator import Evaluator
from evolve.genome import Genome
from evolve.pareto import objectives, write_front
from evolve.report import write_report
from evolve.scoring import combined_score, format_exception
from evolve.searcher import NSGA2Searcher, Searcher
from evolve.stages import is_staged, plan_stages, recipe_yaml, run_command, run_stages
from evolve.storage import CHECKPOINT, Storage
from evolve.subsample import agreement_report, rescore_points, subsample_round, top_candidates
from evolve.tracking import Tracker
from ray_merge.engine import run_merge
from ray_merge.errors import UserError
from ray_merge.execute.ray.pool import WorkPool
from ray_merge.execute.ray.session import ray_session, worker_runtime_env
from ray_merge.options import MergeOptions, WorkerSpec
from ray_merge.recipe.load import recipe_from_dict


@dataclass
class Candidate:
    id: str
    generation: int
    index: int
    x: np.ndarray
    recipe: dict  # the recipe recorded (and written to best_config.yml)
    attempts: list = field(default_factory=list)
    excluded: set = field(default_factory=set)
    eval_recipe: Optional[dict] = None  # what the evaluators build, when not ``recipe`` (a padded layer path)
    subsample: Optional[dict] = None  # the draw of examples it is scored on ({size, seed, round}); None: all


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
    max_time_s: Optional[float] = None  # default: the config's search.max_time_s
    patience: Optional[int] = None  # default: the config's search.patience
    eval_timeout_s: Optional[float] = None  # default: the config's evaluation.timeout_s
    wandb: Optional[dict] = None  # wandb.init's project / entity: log to Weights & Biases too
    allow_crimes: bool = False
    save_final_model: bool = False  # merge the best recipe into STORAGE/final_model at the end


def _say(opts: RunOptions, msg: str) -> None:
    if not opts.quiet:
        print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------
# the evaluator pool
# --------------------------------------------------------------------------------------------------------
class EvaluatorPool:
    """``n`` evaluator actors; ``run`` evaluates candidates with ``in_flight`` per actor and one retry."""

    def __init__(self, spec: dict, n: int, num_cpus: float, num_gpus: float, in_flight: int,
                 say: Callable[[str], None], evaluator_cls: type = Evaluator, timeout_s: Optional[float] = None):
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
        self.timeout_s = timeout_s
        self.restarts = 0
        self._submitted: dict[str, float] = {}  # candidate id -> when it was last handed to an actor
        self._held: set[str] = set()  # ids of the candidates handed to an actor and not settled yet
        self._setups: dict[int, object] = {}  # actor index -> setup ref of a replacement starting up

    def _new_actor(self, name: str):
        import ray

        cls = ray.remote(self.evaluator_cls)
        return cls.options(num_cpus=self.num_cpus, num_gpus=self.num_gpus, runtime_env=worker_runtime_env(),
                           max_concurrency=self.in_flight + 1).remote(self.spec, name)

    def _submit(self, actor, c: Candidate):
        self._submitted[c.id] = time.time()
        self._held.add(c.id)
        if c.subsample is not None:
            return actor.evaluate.remote(c.id, c.eval_recipe or c.recipe, c.subsample)
        return actor.evaluate.remote(c.id, c.eval_recipe or c.recipe)

    def start(self) -> None:
        import ray

        self.names = [f"eval-{i}" for i in range(self.n)]
        self.pool = WorkPool([self._new_actor(name) for name in self.names], self._submit, slots=self.in_flight,
                             timeout_s=self.timeout_s)
        refs = [a.setup.remote() for a in self.pool.actors]
        try:
            self.infos = ray.get(refs, timeout=float(os.environ.get("RAY_MERGE_EVOLVE_SETUP_TIMEOUT", 900)))
        except ray.exceptions.GetTimeoutError:
            raise UserError(f"evaluators did not start within the timeout: does the cluster have "
                            f"{self.n} x (CPU {self.num_cpus}, GPU {self.num_gpus}) free?")
        except Exception as e:  # noqa: BLE001 - a setup error: one line, no traceback
            raise UserError(f"an evaluator failed to start: {format_exception(e)}", source=self.spec["source"])

    def _replace(self, i: int, why: str) -> list[Candidate]:
        """Kill actor ``i`` and start a new one in its place; returns the candidates the old one held.

        The new actor sets itself up in the background and takes candidates once it is ready: nothing waits."""
        import ray

        self.restarts += 1
        name = f"{self.names[i].split('~')[0]}~{self.restarts}"
        self.say(f"{why}; starting {name}")
        try:
            ray.kill(self.pool.actors[i])
        except Exception:  # noqa: BLE001
            pass
        self.names[i] = name
        actor = self._new_actor(name)
        lost = self.pool.replace(i, actor)
        self._setups[i] = actor.setup.remote()
        for c in lost:
            self._held.discard(c.id)
        return lost

    def _ready(self, i: int, wait: bool = False) -> bool:
        """Whether actor ``i`` has finished setting up (``wait``: wait for it). A failed set-up is fatal."""
        import ray

        ref = self._setups.get(i)
        if ref is None:
            return True
        if not wait and not ray.wait([ref], timeout=0)[0]:
            return False
        del self._setups[i]
        try:
            self.infos[i] = ray.get(ref, timeout=float(os.environ.get("RAY_MERGE_EVOLVE_SETUP_TIMEOUT", 900)))
        except Exception as e:  # noqa: BLE001
            raise UserError(f"a replacement evaluator failed to start: {format_exception(e)}",
                            source=self.spec["source"])
        return True

    def run(self, cands: list[Candidate], on_done: Callable[[Candidate, Optional[dict], Optional[str]], None]):
        """Evaluate ``cands``; ``on_done(candidate, result or None, error or None)`` as each finishes."""
        queue = list(cands)
        while True:
            self._run(queue, on_done)
            if not queue:
                return
            for i in list(self._setups):  # what is left waits for replacement actors to start
                self._ready(i, wait=True)

    def _run(self, queue: list[Candidate], on_done) -> None:
        def next_item(i: int) -> Optional[Candidate]:
            if not self._ready(i):
                return None
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
            if out.item is not None and out.kind != "timeout":
                self._held.discard(out.item.id)
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
                for c in self._replace(out.actor, f"evaluator {worker} died"):
                    self._failed(c, worker, died, queue, on_done)
            elif out.kind == "timeout":
                c = out.item
                if c.id not in self._held:  # already taken back with an actor replaced before
                    continue
                # the actor is stuck in it: kill and replace it; the others it held were not at fault
                others = [o for o in self._replace(out.actor, f"evaluator {worker} hung on candidate {c.id}")
                          if o is not c]
                queue[:0] = others
                self._failed(c, worker, f"timed out after {self.timeout_s:g} s", queue, on_done)

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

        for i, ref in list(self._setups.items()):  # the replacements' descriptions
            try:
                self.infos[i] = ray.get(ref, timeout=30)
            except Exception as e:  # noqa: BLE001
                self.infos[i] = {"worker": self.names[i], "error": format_exception(e), "setup_s": 0.0}
        self._setups.clear()
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


def make_genome(cfg: EvolveConfig):
    """The genome of ``genome.kind``: parameter space (evolve.genome), layer paths (evolve.dataflow) or both
    (evolve.both)."""
    if cfg.genome.kind == "dataflow":
        return DataflowGenome.from_config(cfg.genome, cfg.source)
    if cfg.genome.kind == "both":
        return BothGenome.from_config(cfg.genome, cfg.source)
    return Genome.from_config(cfg.genome, cfg.source)


def run_search(cfg: EvolveConfig, storage_path: str, opts: RunOptions, evaluator_cls: type = Evaluator) -> dict:
    """Run (or resume) the search. Returns the summary dict the report prints.

    ``evaluator_cls``: the evaluator actor's class (``Evaluator``, or a subclass of it)."""
    t_start = time.time()
    storage = Storage(storage_path)
    storage.start(cfg, resume=opts.resume)
    genome = make_genome(cfg)
    strategy = cfg.search.strategy
    if strategy == "nsga2" and opts.sigma0:
        raise UserError("--sigma0 is a CMA-ES setting; search.strategy is nsga2", source=cfg.source)
    if genome.dim == 1 and strategy == "cma":
        raise UserError("the genome has one gene; CMA-ES needs at least two (add a filter, a layer group or a "
                        "parameter)", source=cfg.source, key="genome")
    say = lambda m: _say(opts, m)  # noqa: E731
    max_fevals = opts.max_fevals or cfg.search.max_fevals
    max_time_s = opts.max_time_s or cfg.search.max_time_s
    patience = opts.patience or cfg.search.patience
    session = uuid.uuid4().hex[:8]

    # The first recipe is planned here: a recipe the planner rejects fails now, with one line.
    # (The evaluators instantiate their model from it: for a layer path, padded to max_layers.)
    first_recipe = genome.eval_recipe(genome.initial())
    plan_stages(first_recipe, source=f"{cfg.source} (genome -> recipe)", seed=cfg.seed,
                allow_crimes=opts.allow_crimes)

    history = storage.read_history() if opts.resume else []
    done_by_id = {r["id"]: r for r in history}
    loaded = storage.load_checkpoint() if opts.resume else None
    if loaded is None:
        if strategy == "nsga2":
            searcher = NSGA2Searcher.start(genome, cfg.search, len(cfg.tasks), seed=opts.seed, popsize=opts.popsize)
        else:
            searcher = Searcher.start(genome, cfg.search, cfg.source, seed=opts.seed, popsize=opts.popsize,
                                      sigma0=opts.sigma0)
        generation = 0
    else:
        meta, arrays = loaded
        saved_strategy = meta.get("strategy", "cma")
        if saved_strategy != strategy:
            raise UserError(f"the search stored here uses search.strategy {saved_strategy}, the config "
                            f"{strategy}", source=cfg.source, key="search.strategy")
        if strategy == "nsga2":
            searcher = NSGA2Searcher.restore(meta, arrays, storage.file(CHECKPOINT))
        else:
            searcher = Searcher.restore(meta, arrays, storage.file(CHECKPOINT), cfg.search.cma_options)
        generation = meta.get("generation")
        if not isinstance(generation, int) or generation < 0 or searcher.dim != genome.dim:
            raise UserError(f"the checkpoint does not belong to this genome ({genome.dim} genes)",
                            source=storage.file(CHECKPOINT))
        say(f"resuming at generation {generation}: {len(history)} evaluation(s) in the history")
    population = searcher.pending

    best = None
    for r in history:
        if r.get("status") == "ok" and (best is None or r["score"] > best["score"]):
            best = r

    def stop_reason() -> Optional[str]:
        """Why the search ends here, after the generations done (None: it goes on)."""
        if len(done_by_id) >= max_fevals:
            return "max_fevals"
        if patience and best is not None and generation - 1 - best["generation"] >= patience:
            return f"patience ({patience} generations without a better best)"
        stop = searcher.stop()
        return ", ".join(f"{k}" for k in stop) if stop else None

    def checkpoint() -> None:
        meta, arrays = searcher.state()
        meta.update(generation=generation, fevals=len(done_by_id), session=session,
                    ids=_ids(generation, len(population)) if population is not None else None)
        storage.save_checkpoint(meta, arrays)

    unsaved = False  # a new generation is checkpointed once the evaluators are up (a failed start leaves none)
    finished = stop_reason() if population is None else None
    if population is None and finished is None:
        population = searcher.ask() or None
        unsaved = True
        if population is None:
            finished = stop_reason()
    sub = cfg.evaluation.subsample

    ev = cfg.evaluation
    spec = {"evaluation": {**ev.__dict__}, "tasks": [t.__dict__ for t in cfg.tasks], "seed": cfg.seed,
            "first_recipe": first_recipe, "source": cfg.source, "allow_crimes": opts.allow_crimes}
    ray_spec = WorkerSpec(workers=opts.workers or ev.workers, address=opts.address, cpus=ev.num_cpus)
    summary: dict = {"session": session}
    pool = None
    work = (population is not None or (ev.score_inputs and bool(_input_candidates(cfg, storage, genome)))
            or bool(_rescore_candidates(cfg, storage, genome, history, None)))
    if not work:
        hint = "raise --max-fevals to continue the search" if finished == "max_fevals" else "stopped: " + finished
        say(f"nothing left to evaluate in {storage.path}: {len(done_by_id)} evaluation(s) done ({hint})")
        summary["stop_reason"] = finished
    else:
        tracker = Tracker(storage.file("tensorboard"), say, opts.wandb, cfg.raw)
        with ray_session(ray_spec, opts.verbose):
            n, cpus, gpus = _cluster_workers(ev, opts.workers or ev.workers)
            timeout_s = opts.eval_timeout_s or ev.timeout_s
            say(f"{genome.describe()}\nstarting {n} evaluator(s) ({ev.backend} backend, {cpus:g} CPU / "
                f"{gpus:g} GPU each, {ev.in_flight} candidates in flight each"
                + (f", {timeout_s:g} s per evaluation at most)" if timeout_s else ")"))
            pool = EvaluatorPool(spec, n, cpus, gpus, ev.in_flight, say, evaluator_cls, timeout_s)
            try:
                pool.start()
                say(f"evaluators ready in {max(i['setup_s'] for i in pool.infos):.1f}s")
                if unsaved:
                    checkpoint()
                if ev.score_inputs:
                    _score_inputs(cfg, storage, pool, say, genome)

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
                    if c.subsample is not None:
                        rec["subsample"] = c.subsample
                    rec["fitness"] = -rec["score"] if res else None
                    storage.append_history(rec)
                    done_by_id[c.id] = rec
                    if res and (best is None or rec["score"] > best["score"]):
                        best = rec
                        storage.write_best(rec, len(done_by_id))
                    tracker.evaluation(rec, best["score"] if best else None)

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
                        recipe = genome.to_recipe(x)
                        draw = None if sub is None else {"size": sub["size"], "seed": sub["seed"],
                                                         "round": subsample_round(sub["mode"], generation)}
                        cands.append(Candidate(cid, generation, i, x, recipe, eval_recipe=genome.for_evaluator(recipe),
                                               subsample=draw))
                    t_gen = time.time()
                    if cands:
                        pool.run(cands, on_done)
                    recs = [done_by_id[cid] for cid in ids]
                    ok = [r for r in recs if r["status"] == "ok"]
                    if not ok and best is None:
                        raise UserError(f"every candidate of generation {generation} failed: {recs[0]['error']}",
                                        source=cfg.source)
                    searcher.tell(population, _fitness(strategy, recs, done_by_id, spec["tasks"]))
                    tracker.generation(generation, recs, best["score"])
                    scores = [r["score"] for r in ok]
                    top = max(scores, default=float("nan"))
                    say(f"generation {generation}: {len(ok)}/{len(recs)} ok, best {top:.4f}"
                        f" mean {np.mean(scores) if scores else float('nan'):.4f}; best so far {best['score']:.4f} "
                        f"({best['id']}); {len(done_by_id)}/{max_fevals} evaluations; {time.time() - t_gen:.1f}s")
                    if strategy == "nsga2":
                        write_front(storage, list(done_by_id.values()), cfg.tasks)
                    if sub is not None and generation in rescore_points(generation, sub["rescore_every"]):
                        _rescore(cfg, storage, pool, genome, list(done_by_id.values()), generation, say)
                    generation += 1
                    reason = stop_reason()
                    if reason is None and max_time_s and time.time() - t_start >= max_time_s:
                        reason = f"max_time ({max_time_s:g} s; --resume continues)"
                    if reason is None:
                        population = searcher.ask() or None
                        reason = stop_reason() if population is None else None
                    if reason is not None:
                        population = None
                        summary["stop_reason"] = reason
                    checkpoint()
                    if opts.report:  # the live report: refreshed after every generation
                        write_report(storage, genome, cfg, dict(summary, session_s=time.time() - t_start,
                                                                stop_reason=reason or "running"))
                if sub is not None:  # the end of the session: the best so far on the full sets
                    _rescore(cfg, storage, pool, genome, list(done_by_id.values()), None, say)
                summary["worker_stats"] = pool.stats()
                summary["workers"] = pool.infos
                summary["restarts"] = pool.restarts
            finally:
                pool.close()
                tracker.close()
    summary.setdefault("stop_reason", stop_reason() or "already finished")
    summary["session_s"] = time.time() - t_start
    if opts.save_final_model and best is not None:
        out = storage.file("final_model")
        say(f"merging the best recipe ({best['id']}) into {out}")
        options = MergeOptions(random_seed=cfg.seed, allow_crimes=opts.allow_crimes, quiet=opts.quiet)
        if is_staged(best["recipe"]):  # kind: both: stage 1 goes to a scratch directory
            run_stages(best["recipe"], out, storage.path, options, source=storage.file("best_config.yml"))
        else:
            run_merge(recipe_from_dict(best["recipe"], source=storage.file("best_config.yml")), out, options)
    if opts.report:
        text = write_report(storage, genome, cfg, summary)
        if not opts.quiet:
            print(text)
    return summary


def _fitness(strategy: str, recs: list[dict], done_by_id: dict, tasks: list[dict]) -> list:
    """What the strategy is told (lower is better): CMA-ES the negated combined score, NSGA-II the negated
    objective vector; a failed candidate gets one more than the worst value seen (per objective)."""
    ok = [r for r in done_by_id.values() if r["status"] == "ok"]
    if strategy == "nsga2":
        worst = np.max([-objectives(r["scores"], tasks) for r in ok], axis=0)
        return [(-objectives(r["scores"], tasks) if r["status"] == "ok" else worst + 1.0).tolist() for r in recs]
    worst = max(r["fitness"] for r in ok)
    return [r["fitness"] if r["status"] == "ok" else worst + 1.0 for r in recs]


RESCORED = "rescored.jsonl"


def _rescore_candidates(cfg: EvolveConfig, storage: Storage, genome, history: list[dict],
                        upto: Optional[int]) -> list[Candidate]:
    """The top candidates (of the generations up to ``upto``; None: all) not yet scored on the full sets."""
    sub = cfg.evaluation.subsample
    if sub is None:
        return []
    have = {r["id"] for r in storage._read_jsonl(RESCORED)}
    return [Candidate(f"full:{r['id']}", r["generation"], r["index"], np.asarray(r["genotype"]), r["recipe"],
                      eval_recipe=genome.for_evaluator(r["recipe"]))
            for r in top_candidates(history, sub["rescore_top"], upto) if r["id"] not in have]


def _rescore(cfg: EvolveConfig, storage: Storage, pool: EvaluatorPool, genome, history: list[dict],
             upto: Optional[int], say) -> dict:
    """Score the top candidates on the full sets (those not done yet), then rewrite subsample_agreement.json
    and best_full_config.yml. Returns the agreement report."""
    by_id = {r["id"]: r for r in history}
    tasks = [t.__dict__ for t in cfg.tasks]

    def on_done(c: Candidate, res: Optional[dict], err: Optional[str]) -> None:
        r = by_id[c.id[len("full:"):]]
        rec = {"id": r["id"], "generation": r["generation"], "status": "ok" if res else "failed",
               "scores": res["scores"] if res else None,
               "score": combined_score(res["scores"], tasks) if res else None,
               "cheap_scores": r["scores"], "cheap_score": r["score"], "subsample": r.get("subsample"),
               "error": err, "finished_at": time.time()}
        storage._append_jsonl(RESCORED, rec)

    cands = _rescore_candidates(cfg, storage, genome, history, upto)
    if cands:
        say(f"re-scoring {len(cands)} candidate(s) on the full sets")
        pool.run(cands, on_done)
    return write_agreement(cfg, storage, history)


def write_agreement(cfg: EvolveConfig, storage: Storage, history: list[dict]) -> dict:
    """subsample_agreement.json from the history and rescored.jsonl; best_full_config.yml: the re-scored
    candidate with the best full-set combined score."""
    rescored = {r["id"]: r for r in storage._read_jsonl(RESCORED)}
    last = max((r["generation"] for r in history if r.get("generation", -1) >= 0), default=-1)
    report = agreement_report(history, rescored, cfg.evaluation.subsample, last)
    storage.write_atomic("subsample_agreement.json", json.dumps(report, indent=1))
    ok = sorted((r for r in rescored.values() if r["status"] == "ok"), key=lambda r: (-r["score"], r["id"]))
    if ok:
        best = ok[0]
        recipe = next(r["recipe"] for r in history if r["id"] == best["id"])
        scores = ", ".join(f"{k} {v:.4f}" for k, v in best["scores"].items())
        header = (f"# ray-merge evolve: the best of {len(ok)} candidate(s) re-scored on the full sets: candidate "
                  f"{best['id']}, score {best['score']:.6g} ({scores}; on the subsample: "
                  f"{best['cheap_score']:.6g})\n# run it with: {run_command(recipe, 'best_full_config.yml')}\n")
        storage.write_atomic("best_full_config.yml", header + recipe_yaml(recipe))
    return report


def _input_candidates(cfg: EvolveConfig, storage: Storage, genome=None) -> list[Candidate]:
    """The input models not scored yet, each as a passthrough recipe (scored like the candidates; built as
    ``genome.for_evaluator`` has it)."""
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
        cands.append(Candidate(cid, -1, len(cands), np.zeros(0), recipe,
                               eval_recipe=genome.for_evaluator(recipe) if genome is not None else None))
    return cands


def _score_inputs(cfg: EvolveConfig, storage: Storage, pool: EvaluatorPool, say, genome=None) -> list[dict]:
    """Score each input model once."""
    have = {r["id"]: r for r in storage.read_inputs()}
    cands = _input_candidates(cfg, storage, genome)
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
