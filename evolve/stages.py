"""Multi-stage candidates (``genome.kind: both``): a recipe that is a list of recipes, mergekit-multi's documents.

A candidate's recipe is either one recipe (a dict) or a list of them in dependency order: every stage but the
last has ``name: X`` and later stages name ``X`` where a model goes, as in a ``ray-merge multi`` file. The
history holds the list as it is; ``best_config.yml`` holds it as a multi-document YAML file (``recipe_yaml``),
which ``ray-merge multi FILE OUT_DIR`` runs (the final model: ``OUT_DIR/final``).

The evaluators never write a stage to disk: ``plan_stages`` plans each stage with the earlier stages' metadata
taken from their plans (the planner's ``in_memory`` models: config, tensor names, shapes and dtypes), and the
evaluator merges each stage in memory and hands its tensors to the next stage's loader
(``ResidentLoader.in_memory``). A stage that no later stage uses is not planned at all.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
from typing import Any, Optional, Union

import yaml

from ray_merge.dtypes import DTYPE_BY_NAME
from ray_merge.engine import run_merge
from ray_merge.io.models import TensorMeta, index_weights
from ray_merge.options import MergeOptions
from ray_merge.planner.plan import Plan, plan_recipe
from ray_merge.recipe.load import recipe_from_dict

Recipe = Union[dict, list]


def is_staged(recipe: Recipe) -> bool:
    return isinstance(recipe, list)


def recipe_yaml(recipe: Recipe) -> str:
    """The text of a recipe file: one YAML document, or one per stage separated by ``---``."""
    if is_staged(recipe):
        return yaml.safe_dump_all(recipe, sort_keys=False)
    return yaml.safe_dump(recipe, sort_keys=False)


def run_command(recipe: Recipe, file: str) -> str:
    """The command that merges a recipe file written by ``recipe_yaml``."""
    if is_staged(recipe):
        return f"ray-merge multi {file} OUTPUT_DIR  (the final model: OUTPUT_DIR/final)"
    return f"ray-merge run {file} OUTPUT_DIR"


def stage_name(doc: dict) -> Optional[str]:
    return doc.get("name")


def stage_models(doc: dict) -> set[str]:
    """Every model a recipe names (base_model, models, slices' sources and base_model)."""
    out: set[str] = set()

    def add(v: Any) -> None:
        if isinstance(v, dict):
            v = v.get("model")
        if isinstance(v, str):
            out.add(v)

    add(doc.get("base_model"))
    for m in doc.get("models") or []:
        add(m)
    for sl in doc.get("slices") or []:
        add(sl.get("base_model"))
        for src in sl.get("sources") or []:
            add(src)
    return out


def memory_model(plan: Plan) -> tuple[str, dict, dict[str, TensorMeta]]:
    """The planner's ``in_memory`` entry for a plan's output merged in memory: (directory of its tokenizer and
    extra files: the plan's donor's, as the written output would have them; its config; its tensors' shapes and
    dtypes). A copied integer buffer keeps its source's location, where the planner can compare its bytes."""
    path = plan.models[plan.donor].path
    index: dict[str, TensorMeta] = {}
    indexes: dict[int, dict[str, TensorMeta]] = {}
    for pt in plan.tensors:
        if pt.compute_dtype is None and pt.inputs:  # a non-float buffer, copied as it is
            inp = pt.inputs[0]
            if inp.model not in indexes:
                m = plan.models[inp.model]
                indexes[inp.model] = index_weights(m.path, m.ref)
            index[pt.name] = indexes[inp.model][inp.tensor]
            continue
        index[pt.name] = TensorMeta(file=os.path.join(path, "<in memory>"), shape=tuple(pt.shape),
                                    dtype=DTYPE_BY_NAME[pt.out_dtype])
    return path, dict(plan.out_config), index


def plan_stages(recipe: Recipe, *, source: str, seed: Optional[int], allow_crimes: bool = False
                ) -> list[tuple[Optional[str], Plan]]:
    """(stage name, plan) of every stage the final one needs, in order (a plain recipe: itself, unnamed).

    Later stages are planned from the earlier ones' plans (nothing of them needs to be on disk)."""
    docs = recipe if is_staged(recipe) else [recipe]
    needed: set[str] = set()
    keep = [False] * len(docs)
    for i in range(len(docs) - 1, -1, -1):  # the last stage, and every stage a kept one names
        name = stage_name(docs[i])
        if i == len(docs) - 1 or name in needed:
            keep[i] = True
            needed |= stage_models(docs[i])
    given: dict[str, tuple[str, dict, dict[str, TensorMeta]]] = {}
    out: list[tuple[Optional[str], Plan]] = []
    for i, doc in enumerate(docs):
        if not keep[i]:
            continue
        name = stage_name(doc)
        body = {k: v for k, v in doc.items() if k != "name"}
        where = source if len(docs) == 1 else f"{source} (stage {name or 'final'})"
        plan = plan_recipe(recipe_from_dict(body, source=where), allow_crimes=allow_crimes, seed=seed,
                           in_memory=dict(given))
        out.append((name, plan))
        if name is not None:
            given[name] = memory_model(plan)
    return out


def with_paths(doc: dict, paths: dict[str, str]) -> dict:
    """A copy of a recipe with the stage names it uses as models replaced by those stages' output paths."""
    d = copy.deepcopy(doc)
    d.pop("name", None)
    ref = lambda v: paths.get(v, v) if isinstance(v, str) else v  # noqa: E731

    def entry(m: Any) -> Any:
        if isinstance(m, dict) and "model" in m:
            return dict(m, model=ref(m["model"]))
        return ref(m)

    if "base_model" in d:
        d["base_model"] = ref(d["base_model"])
    if isinstance(d.get("models"), list):
        d["models"] = [entry(m) for m in d["models"]]
    for sl in d.get("slices") or []:
        if "base_model" in sl:
            sl["base_model"] = ref(sl["base_model"])
        sl["sources"] = [entry(s) for s in sl.get("sources") or []]
    return d


def run_stages(recipe: list, out: str, work_parent: str, options: MergeOptions, *, source: str) -> None:
    """Merge a multi-stage recipe to disk as ``ray-merge multi`` does: each named stage the final one needs
    into a scratch directory under ``work_parent`` (removed at the end), the final stage into ``out``."""
    names = {stage_name(d) for d in recipe if stage_name(d)}
    needed = {n for d in recipe for n in stage_models(d) if n in names}
    os.makedirs(work_parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix="stages-", dir=work_parent)
    paths = {n: os.path.join(work, n) for n in names}
    try:
        for i, doc in enumerate(recipe):
            name = stage_name(doc)
            last = i == len(recipe) - 1
            if last or name in needed:
                where = f"{source} (stage {name or 'final'})"
                run_merge(recipe_from_dict(with_paths(doc, paths), source=where), out if last else paths[name],
                          options)
    finally:
        shutil.rmtree(work, ignore_errors=True)
