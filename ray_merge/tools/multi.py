"""Multi-stage merges (mergekit-multi's format): several recipes in one YAML file.

Each document is a recipe; ``name: X`` makes its output ``OUT_DIR/X``, and any later
(or earlier: order does not matter) recipe may name ``X`` where a model goes. Stages
run in dependency order, each with the merge engine's ``run_merge``. A stage whose
output is already complete is skipped; one that was interrupted is resumed. With
Ray, stages whose inputs are ready run at the same time, one Ray task each.

A state file in OUT_DIR records, per stage, a stamp of its recipe and of the stamps
of the stages it reads, so a rerun rebuilds a stage whose recipe, or an upstream
stage, changed instead of silently keeping it (outputs not made by ray-merge are
kept as they are, as mergekit-multi does).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Optional

import yaml

from ray_merge.engine import run_merge
from ray_merge.errors import UserError
from ray_merge.execute.ray.session import (
    concurrency,
    ray_session,
    task_options,
    unwrap_ray_error,
)
from ray_merge.output.staging import MANIFEST, staging_dir
from ray_merge.planner.memory import default_memory_budget
from ray_merge.recipe.load import recipe_from_dict
from ray_merge.recipe.schema import Recipe

log = logging.getLogger("ray_merge.multi")


STATE_FILE = "ray_merge_multi_state.json"


FINAL = "final"


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


@dataclass
class Stage:
    name: Optional[str]  # None: the unnamed final recipe
    doc: dict  # the recipe, stage names replaced by output paths
    deps: list[str]
    out: str
    recipe: Optional[Recipe] = None
    stamp: str = ""

    @property
    def label(self) -> str:
        return self.name or "(final)"


@dataclass
class StageResult:
    label: str
    status: str  # merged | skipped
    out: str
    seconds: float = 0.0


@dataclass
class MultiPlan:
    source: str
    out_dir: str
    stages: list[Stage] = field(default_factory=list)  # in dependency order


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def load_multi(path: str, out_dir: str, *, out_path: Optional[str] = None,
               overrides: Optional[list[str]] = None) -> MultiPlan:
    if not os.path.isfile(path):
        raise UserError("file not found", source=path)
    try:
        with open(path, encoding="utf-8") as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"malformed YAML: {' '.join(str(e).split())}", source=path)
    if not docs:
        raise UserError("no recipes in the file", source=path)
    out_dir = os.path.abspath(out_dir)

    named: dict[Optional[str], dict] = {}
    for i, doc in enumerate(docs):
        where = f"{path} (document {i + 1})"
        if not isinstance(doc, dict):
            raise UserError("each document must be a recipe (a mapping of keys)", source=where)
        doc = copy.deepcopy(doc)
        name = doc.pop("name", None)
        if name is not None:
            if not isinstance(name, str) or not name.strip() or name in (".", "..") or "/" in name or \
                    os.sep in name or name.startswith("."):
                raise UserError(f"stage name {name!r} must be a plain directory name", source=where, key="name")
            if name in named:
                raise UserError(f"two recipes are named {name!r}", source=where, key="name")
        elif None in named:
            raise UserError("only one recipe may be left without a name (the final merge)", source=where)
        named[name] = doc

    names = {n for n in named if n is not None}
    final_out = None
    if None in named:
        if out_path:
            final_out = os.path.abspath(out_path)
        elif FINAL in names:
            raise UserError(f"a stage is named {FINAL!r}, so the unnamed recipe needs --out-path", source=path)
        else:
            final_out = os.path.join(out_dir, FINAL)

    stages: dict[Optional[str], Stage] = {}
    for name, doc in named.items():
        used: list[str] = []
        patched = _patch_refs(doc, names, out_dir, used)
        if name is not None and name in used:
            raise UserError(f"stage {name!r} uses its own output as a model", source=path)
        out = final_out if name is None else os.path.join(out_dir, name)
        stages[name] = Stage(name=name, doc=patched, deps=sorted(set(used)), out=out)

    order = _topological(stages, path)
    for st in order:
        where = f"{path} (stage {st.label})"
        st.recipe = recipe_from_dict(st.doc, source=where, overrides=overrides)
        h = hashlib.sha256(st.recipe.hash.encode())
        for d in st.deps:
            h.update(stages[d].stamp.encode())
        st.stamp = h.hexdigest()
    return MultiPlan(source=path, out_dir=out_dir, stages=order)


def _patch_refs(doc: dict, names: set, out_dir: str, used: list[str]) -> dict:
    """Replace stage names used as models by their output paths; make local paths absolute."""

    def ref(value):
        if not isinstance(value, str):
            return value
        if value in names:
            used.append(value)
            return os.path.join(out_dir, value)
        if os.path.isdir(value) and not os.path.isabs(value):
            return os.path.abspath(value)  # Ray workers may run in another directory
        return value

    d = copy.deepcopy(doc)
    if "base_model" in d:
        d["base_model"] = ref(d["base_model"])
    if isinstance(d.get("models"), list):
        for i, m in enumerate(d["models"]):
            if isinstance(m, dict) and "model" in m:
                m["model"] = ref(m["model"])
            else:
                d["models"][i] = ref(m)
    if isinstance(d.get("slices"), list):
        for s in d["slices"]:
            if not isinstance(s, dict):
                continue
            if "base_model" in s:
                s["base_model"] = ref(s["base_model"])
            for src in s.get("sources") or []:
                if isinstance(src, dict) and "model" in src:
                    src["model"] = ref(src["model"])
    ts = d.get("tokenizer_source")
    if isinstance(ts, str) and ts not in ("union", "base"):
        d["tokenizer_source"] = ref(ts)
    tok = d.get("tokenizer")
    if isinstance(tok, dict):
        if isinstance(tok.get("source"), str) and tok["source"] not in ("union", "base"):
            tok["source"] = ref(tok["source"])
        for spec in (tok.get("tokens") or {}).values():
            if isinstance(spec, dict):
                src = spec.get("source")
                if isinstance(src, str):
                    spec["source"] = ref(src)
                elif isinstance(src, dict) and isinstance(src.get("model"), str):
                    src["model"] = ref(src["model"])
    return d


def _topological(stages: dict, path: str) -> list[Stage]:
    order: list[Stage] = []
    state: dict = {}

    def visit(name, chain):
        if state.get(name) == "done":
            return
        if state.get(name) == "active":
            cycle = chain[chain.index(name):] + [name]
            raise UserError("stages depend on each other in a cycle: "
                            + " -> ".join(str(c or "(final)") for c in cycle), source=path)
        state[name] = "active"
        for d in stages[name].deps:
            visit(d, chain + [name])
        state[name] = "done"
        order.append(stages[name])

    for name in stages:  # file order, where dependencies allow
        visit(name, [])
    return order


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------


def is_complete(out: str) -> bool:
    return os.path.isfile(os.path.join(out, "config.json")) and \
        any(os.path.exists(os.path.join(out, f)) for f in _WEIGHT_FILES)


def _read_state(out_dir: str) -> dict:
    try:
        with open(os.path.join(out_dir, STATE_FILE)) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _write_state(out_dir: str, state: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, STATE_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(state, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, STATE_FILE))


def _made_by_us(out: str) -> bool:
    return os.path.isfile(os.path.join(out, MANIFEST))


def run_stage(recipe: Recipe, out: str, options, rebuild: bool) -> float:
    """Merge one stage into ``out`` (with ``rebuild``, replacing what is there once the new one is done)."""

    start = time.time()
    if rebuild and os.path.exists(out):
        tmp = out + ".ray-merge-rebuild"
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        if os.path.isdir(staging_dir(tmp)):
            shutil.rmtree(staging_dir(tmp))
        run_merge(recipe, tmp, replace(options, resume=False))
        shutil.rmtree(out)
        os.replace(tmp, out)
    else:
        resume = os.path.isdir(staging_dir(out)) and not rebuild
        if rebuild and os.path.isdir(staging_dir(out)):
            shutil.rmtree(staging_dir(out))
        run_merge(recipe, out, replace(options, resume=resume))
    return time.time() - start


def run_multi(path: str, out_dir: str, options, *, out_path: Optional[str] = None, lazy: bool = True,
              overrides: Optional[list[str]] = None, ray=None, verbose: int = 0) -> list[StageResult]:
    """Run every stage of a multi-recipe file; return what happened to each, in dependency order.

    ``ray``: a ray_merge.options.WorkerSpec to run stages as Ray tasks (independent ones at
    once, one task per worker slot), or None to run them one after another here.
    """
    if ray is not None and ray.workers is not None and ray.workers < 1:
        raise UserError(f"--workers must be at least 1, got {ray.workers}")
    plan = load_multi(path, out_dir, out_path=out_path, overrides=overrides)
    state = _read_state(plan.out_dir)
    results: dict[str, StageResult] = {}
    todo: list[Stage] = []
    rebuild: dict[str, bool] = {}
    stale_upstream: set = set()
    for st in plan.stages:
        key = st.label
        recorded = state.get(key, {})
        upstream_runs = any(d in stale_upstream for d in st.deps)
        if is_complete(st.out) and not os.path.isdir(staging_dir(st.out)):
            current = not upstream_runs and (not recorded or recorded.get("stamp") == st.stamp)
            if lazy and current:
                results[key] = StageResult(key, "skipped", st.out)
                continue
            if not recorded and not _made_by_us(st.out):
                raise UserError(f"stage {key}: {st.out} exists and was not made by ray-merge; remove it to "
                                "rebuild it", source=path)
            if lazy and not options.quiet:
                why = "an input stage was rebuilt" if upstream_runs else "its recipe changed"
                print(f"ray-merge: note: stage {key} is out of date ({why}); rebuilding it", file=sys.stderr)
            rebuild[key] = True
        elif os.path.exists(st.out) and (not os.path.isdir(st.out) or os.listdir(st.out)):
            raise UserError(f"stage {key}: {st.out} exists but is not a finished model; remove it", source=path)
        else:
            rebuild[key] = not lazy  # --no-lazy also discards an interrupted run
        todo.append(st)
        stale_upstream.add(st.name)

    def finished(st: Stage, seconds: float) -> None:
        results[st.label] = StageResult(st.label, "merged", st.out, seconds)
        state[st.label] = {"stamp": st.stamp, "out": st.out, "time": time.time()}
        _write_state(plan.out_dir, state)
        log.info("stage %s merged in %.1fs", st.label, seconds)

    if todo:
        os.makedirs(plan.out_dir, exist_ok=True)
    if ray is not None and todo:
        _run_on_ray(todo, options, rebuild, finished, ray, verbose)
    else:
        for st in todo:
            if not options.quiet:
                print(f"ray-merge: stage {st.label} -> {st.out}", file=sys.stderr)
            finished(st, run_stage(st.recipe, st.out, options, rebuild[st.label]))
    return [results[st.label] for st in plan.stages]


def _run_on_ray(todo: list[Stage], options, rebuild: dict, finished, spec, verbose: int) -> None:

    pending = list(todo)
    waiting_on = {st.name for st in todo}
    running: dict = {}
    with ray_session(spec, verbose) as ray:
        limit = concurrency(ray, spec)
        stage_opts = replace(options, quiet=True, memory_budget=spec.memory or options.memory_budget)
        if not spec.remote and stage_opts.memory_budget is None:
            # stages on this machine share its memory
            stage_opts = replace(stage_opts, memory_budget=max(1, default_memory_budget(limit)))
        task = ray.remote(run_stage).options(max_retries=0, **task_options(spec))
        while pending or running:
            for st in list(pending):
                if len(running) >= limit:
                    break
                if any(d in waiting_on for d in st.deps):
                    continue
                pending.remove(st)
                running[task.remote(st.recipe, st.out, stage_opts, rebuild[st.label])] = st
            if not running:  # cannot happen with an acyclic plan
                raise RuntimeError("multi: no stage can run")
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                st = running.pop(ref)
                try:
                    seconds = ray.get(ref)
                except Exception as e:
                    for r in running:
                        ray.cancel(r)
                    raise unwrap_ray_error(e)
                waiting_on.discard(st.name)
                finished(st, seconds)
