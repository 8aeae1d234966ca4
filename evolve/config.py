"""The search's YAML: mergekit-evolve's ``genome`` and ``tasks`` sections, plus ray-merge's additions.

Everything checkable without reading a model is checked here; every error is a one-line UserError naming
the file and the key. Relative model paths and task include paths are resolved against the config file's
directory (then the working directory), so a search runs the same from anywhere and its ``best_config.yml``
holds absolute paths.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from evolve.scoring import LM_EVAL_ARGS
from evolve.subsample import MODES as SUBSAMPLE_MODES
from ray_merge.errors import UserError
from ray_merge.methods import get_method
from ray_merge.recipe.load import load_yaml
from ray_merge.recipe.schema import DTYPE_ALIASES, DTYPES

TOP_KEYS = {"genome", "tasks", "search", "evaluation", "seed", "name",
            # mergekit-evolve's top-level lm-eval options
            "limit", "num_fewshot", "shuffle", "random_init", "apply_chat_template", "fewshot_as_multiturn"}
GENOME_KEYS = {"models", "merge_method", "base_model", "tokenizer_source", "tokenizer", "chat_template",
               "layer_granularity", "normalize", "allow_negative_weights", "smooth", "filters",
               "parameters", "dtype", "out_dtype", "kind", "dataflow"}
GENOME_KINDS = ("parameters", "dataflow", "both")
# kind: both: the name of the parameter-space merge (stage 1) in its candidates' two-stage recipes, where the
# layer path (stage 2) uses it as a model
BOTH_STAGE = "merged"
# genome keys kind: both refuses: the in-memory merged model would need its own tokenizer
BOTH_REFUSED_KEYS = ("tokenizer_source", "tokenizer")
DATAFLOW_KEYS = {"max_layers", "repeats", "scale", "scale_filters"}
# genome keys of a parameter-space search only: refused with kind: dataflow (they would be ignored)
PARAMETER_ONLY_KEYS = ("base_model", "layer_granularity", "normalize", "allow_negative_weights", "smooth",
                       "filters", "parameters")
SEARCH_KEYS = {"popsize", "sigma0", "max_fevals", "max_time_s", "patience", "seed", "random_init", "cma_options",
               "strategy"}
STRATEGIES = ("cma", "nsga2")
CMA_ONLY_KEYS = ("sigma0", "cma_options")
EVAL_KEYS = {"backend", "workers", "num_cpus", "num_gpus", "device", "merge_device", "dtype", "batch_size",
             "limit", "num_fewshot", "apply_chat_template", "fewshot_as_multiturn", "system_instruction",
             "include_paths", "lm_eval", "model_args", "vllm_python", "in_flight", "score_inputs",
             "torch_threads", "timeout_s", "subsample"}
SUBSAMPLE_KEYS = {"size", "mode", "seed", "rescore_top", "rescore_every"}
SUBSAMPLE_SCORING_KEYS = ("size", "mode", "seed")  # what a candidate's cheap score depends on
TASK_KEYS = {"name", "weight", "metric"}
BOUND_KEYS = {"min", "max", "init"}
BACKENDS = ("hf", "vllm")
# mergekit-evolve sets normalize: true for these methods when the genome leaves it unset
NORMALIZED_BY_DEFAULT = ("ties", "dare_ties", "linear")
# mergekit-evolve refuses tasks with these prefixes (common benchmarks' test sets) unless told otherwise
BENCHMARK_PREFIXES = ("mmlu", "hendrycks", "agieval", "gsm8k", "hellaswag", "winogrande", "arc_", "ai2_arc",
                      "truthfulqa", "bigbench", "piqa", "openbookqa", "leaderboard")
# simple_evaluate arguments ray-merge sets itself (the rest pass through `evaluation.lm_eval`)
RESERVED_LM_EVAL = {"model", "model_args", "tasks", "task_manager", "limit", "num_fewshot", "batch_size",
                    "device", "apply_chat_template", "fewshot_as_multiturn", "system_instruction"}
# the settings that change a candidate's score: a resumed search must keep them
SCORING_KEYS = ("genome", "tasks", "evaluation.limit", "evaluation.num_fewshot", "evaluation.apply_chat_template",
                "evaluation.fewshot_as_multiturn", "evaluation.system_instruction", "evaluation.lm_eval",
                "evaluation.dtype", "seed", "evaluation.subsample")


@dataclass
class Bounds:
    lo: float
    hi: float
    init: Optional[float] = None


@dataclass
class DataflowConfig:
    """``genome.dataflow``: the layer-path search (evolve.dataflow)."""
    max_layers: Optional[int] = None  # None: twice the deepest input model's layers
    repeats: int = 2  # times each model's layer sequence appears among the candidate layers
    scale: Bounds = field(default_factory=lambda: Bounds(0.5, 1.5, 1.0))  # lo == hi: fixed, not searched
    scale_filters: list[str] = field(default_factory=lambda: ["o_proj", "down_proj"])  # the residual writers


@dataclass
class GenomeConfig:
    models: list[str]
    merge_method: str
    base_model: Optional[str] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[dict] = None
    chat_template: Optional[str] = None
    layer_granularity: int = 0
    normalize: Optional[bool] = None
    allow_negative_weights: bool = False
    smooth: bool = False
    filters: list[str] = field(default_factory=list)
    searched: dict[str, Bounds] = field(default_factory=dict)  # parameters with bounds given in the config
    fixed: dict[str, Any] = field(default_factory=dict)  # parameters set to a value (not searched)
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    kind: str = "parameters"  # or "dataflow": a layer-path search (evolve.dataflow); "both" (evolve.both)
    dataflow: Optional[DataflowConfig] = None  # kind: dataflow or both


@dataclass
class TaskConfig:
    name: str
    weight: float = 1.0
    metric: str = "acc,none"


@dataclass
class SearchConfig:
    popsize: Optional[int] = None  # None: cma's default, 4 + 3 ln(dimension)
    sigma0: float = 1 / 6  # in units of each parameter's range
    max_fevals: int = 100
    max_time_s: Optional[float] = None  # wall-clock budget of a session: stop after the generation that passes it
    patience: Optional[int] = None  # stop after this many generations without a better best
    seed: int = 0
    random_init: bool = False
    cma_options: dict = field(default_factory=dict)
    strategy: str = "cma"  # or "nsga2": a Pareto front over the tasks (evolve.searcher.NSGA2Searcher)


@dataclass
class EvalConfig:
    backend: str = "hf"
    workers: Optional[int] = None  # None: one per GPU, else one per `num_cpus` CPUs
    num_cpus: float = 1.0
    num_gpus: Optional[float] = None  # None: 1 when the cluster has GPUs, else 0
    device: str = "auto"  # where the model is evaluated: auto (cuda when the actor has a GPU), cpu, cuda
    merge_device: str = "cpu"  # where candidates are merged
    dtype: str = "float32"
    batch_size: Any = 32
    limit: Optional[float] = None
    num_fewshot: Optional[int] = None
    apply_chat_template: Any = False
    fewshot_as_multiturn: bool = False
    system_instruction: Optional[str] = None
    include_paths: list[str] = field(default_factory=list)
    lm_eval: dict = field(default_factory=dict)  # more simple_evaluate() arguments
    model_args: dict = field(default_factory=dict)  # more HFLM(...) / vllm.LLM(...) arguments
    vllm_python: Optional[str] = None  # the python of vLLM's venv (default $RAY_MERGE_VLLM_PYTHON, else .venv-vllm/bin/python)
    in_flight: int = 2  # candidates per evaluator at once: one evaluating, the next being built
    score_inputs: bool = True  # also score every input model (reported next to the search's best)
    torch_threads: Optional[int] = None  # default: the actor's CPUs
    timeout_s: Optional[float] = None  # per evaluation: a candidate past it is retried once elsewhere, then failed
    # cheap fitness (evolve.subsample): {size, mode, seed, rescore_top, rescore_every}; None: the full sets
    subsample: Optional[dict] = None


@dataclass
class EvolveConfig:
    genome: GenomeConfig
    tasks: list[TaskConfig]
    search: SearchConfig
    evaluation: EvalConfig
    seed: int = 0
    name: Optional[str] = None
    source: str = "<config>"
    raw: dict = field(default_factory=dict)  # the resolved config (absolute paths), as written to storage

    def scoring_view(self) -> dict:
        """The settings a candidate's score depends on (compared on --resume)."""
        out = {}
        for key in SCORING_KEYS:
            node: Any = self.raw
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            out[key] = node
        if out["evaluation.subsample"] is None:  # absent: the view (and hash) of searches from before the key
            del out["evaluation.subsample"]
        else:
            out["evaluation.subsample"] = {k: out["evaluation.subsample"].get(k) for k in SUBSAMPLE_SCORING_KEYS}
        return out

    @property
    def scoring_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.scoring_view(), sort_keys=True, default=str).encode()).hexdigest()


def load_config(path: str, overrides: Optional[list[str]] = None) -> EvolveConfig:
    data = load_yaml(path, overrides, what="config")
    return config_from_dict(data, source=path, base_dir=os.path.dirname(os.path.abspath(path)))


def config_from_dict(data: dict, source: str = "<config>", base_dir: Optional[str] = None) -> EvolveConfig:
    base_dir = base_dir or os.getcwd()
    data = copy.deepcopy(data)

    def err(key: str, msg: str) -> UserError:
        return UserError(msg, source=source, key=key)

    if not isinstance(data, dict):
        raise err("", "the config must be a mapping with 'genome' and 'tasks'")
    _no_unknown(data, TOP_KEYS, "", err)
    for key in ("genome", "tasks"):
        if data.get(key) is None:
            raise err(key, "missing")

    seed = _int(data.get("seed", 0), "seed", err)
    genome = _genome(data["genome"], base_dir, err)
    data["genome"] = _resolved_genome_raw(data["genome"], genome)
    tasks = _tasks(data["tasks"], err)
    data["tasks"] = [{"name": t.name, "weight": t.weight, "metric": t.metric} for t in tasks]

    search_raw = data.get("search") or {}
    if not isinstance(search_raw, dict):
        raise err("search", "must be a mapping")
    _no_unknown(search_raw, SEARCH_KEYS, "search", err)
    if "random_init" in data:
        if "random_init" in search_raw:
            raise err("random_init", "give it at the top level or under search, not both")
        search_raw["random_init"] = data["random_init"]
    search = SearchConfig(
        popsize=_opt_int(search_raw.get("popsize"), "search.popsize", err, minimum=2),
        sigma0=_float(search_raw.get("sigma0", 1 / 6), "search.sigma0", err, positive=True),
        max_fevals=_int(search_raw.get("max_fevals", 100), "search.max_fevals", err, minimum=1),
        max_time_s=_opt_float(search_raw.get("max_time_s"), "search.max_time_s", err),
        patience=_opt_int(search_raw.get("patience"), "search.patience", err, minimum=1),
        seed=_int(search_raw.get("seed", seed), "search.seed", err),
        random_init=_bool(search_raw.get("random_init", False), "search.random_init", err),
        cma_options=_mapping(search_raw.get("cma_options"), "search.cma_options", err),
        strategy=search_raw.get("strategy", "cma"),
    )
    if search.strategy not in STRATEGIES:
        raise err("search.strategy", f"unknown strategy {search.strategy!r} (use {' or '.join(STRATEGIES)})")
    if search.strategy == "nsga2":
        for key in CMA_ONLY_KEYS:
            if key in search_raw:
                raise err(f"search.{key}", "a CMA-ES setting; search.strategy is nsga2")
        if len(tasks) < 2:
            raise err("search.strategy", "nsga2 needs two or more tasks (each task's score is an objective)")
    for bad in ("bounds", "popsize", "maxfevals", "seed", "x0", "sigma0"):
        if bad in search.cma_options:
            raise err(f"search.cma_options.{bad}", "set by ray-merge (use search.popsize / max_fevals / seed / "
                                                   "sigma0, and genome.parameters for bounds)")

    ev_raw = data.get("evaluation") or {}
    if not isinstance(ev_raw, dict):
        raise err("evaluation", "must be a mapping")
    _no_unknown(ev_raw, EVAL_KEYS, "evaluation", err)
    for key in ("limit", "num_fewshot", "apply_chat_template", "fewshot_as_multiturn", "shuffle"):
        if key in data:
            if key == "shuffle":
                if data[key]:
                    raise err("shuffle", "not supported; pick examples with evaluation.lm_eval.samples")
                continue
            if key in ev_raw:
                raise err(key, f"give it at the top level or as evaluation.{key}, not both")
            ev_raw[key] = data.pop(key)
    data.pop("shuffle", None)
    evaluation = _evaluation(ev_raw, base_dir, err)
    evaluation.subsample = _subsample(ev_raw.get("subsample"), seed, evaluation, err)
    data["evaluation"] = dict(ev_raw, include_paths=evaluation.include_paths)
    if evaluation.subsample is not None:
        data["evaluation"]["subsample"] = dict(evaluation.subsample)
    data["search"] = dict(search_raw)
    data["seed"] = seed
    return EvolveConfig(genome=genome, tasks=tasks, search=search, evaluation=evaluation, seed=seed,
                        name=data.get("name"), source=source, raw=data)


# ---------------------------------------------------------------------------------------------------------

def _no_unknown(d: dict, allowed: set, key: str, err) -> None:
    extra = sorted(set(d) - allowed)
    if extra:
        where = f"{key}.{extra[0]}" if key else extra[0]
        raise err(where, f"unknown key (known: {', '.join(sorted(allowed))})")


def _int(v: Any, key: str, err, minimum: Optional[int] = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise err(key, f"must be an integer, got {v!r}")
    if minimum is not None and v < minimum:
        raise err(key, f"must be at least {minimum}, got {v}")
    return v


def _opt_int(v: Any, key: str, err, minimum: Optional[int] = None) -> Optional[int]:
    return None if v is None else _int(v, key, err, minimum)


def _float(v: Any, key: str, err, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise err(key, f"must be a number, got {v!r}")
    if positive and v <= 0:
        raise err(key, f"must be positive, got {v}")
    return float(v)


def _opt_float(v: Any, key: str, err) -> Optional[float]:
    """None, or a positive number."""
    return None if v is None else _float(v, key, err, positive=True)


def _bool(v: Any, key: str, err) -> bool:
    if not isinstance(v, bool):
        raise err(key, f"must be true or false, got {v!r}")
    return v


def _mapping(v: Any, key: str, err) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise err(key, "must be a mapping")
    return dict(v)


def _str_list(v: Any, key: str, err) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise err(key, "must be a list of strings")
    return list(v)


def resolve_path(value: str, base_dir: str) -> str:
    """A model path relative to the config's directory (or the working directory), made absolute.

    Hub ids (nothing on disk under either) are kept as given.
    """
    if os.path.isabs(value):
        return value
    for root in (base_dir, os.getcwd()):
        candidate = os.path.join(root, value)
        if os.path.exists(candidate):
            return os.path.normpath(os.path.abspath(candidate))
    if value.startswith(("./", "../")):  # clearly a path: name it in full when it is missing
        return os.path.normpath(os.path.join(base_dir, value))
    return value


def _model(v: Any, key: str, base_dir: str, err) -> str:
    if isinstance(v, dict):  # mergekit also accepts {model: ...}
        if set(v) - {"model"} or "model" not in v:
            raise err(key, "must be a model path or hub id")
        v = v["model"]
    if not isinstance(v, str) or not v.strip():
        raise err(key, "must be a model path or hub id")
    return resolve_path(v.strip(), base_dir)


def _genome(g: Any, base_dir: str, err) -> GenomeConfig:
    if not isinstance(g, dict):
        raise err("genome", "must be a mapping")
    _no_unknown(g, GENOME_KEYS, "genome", err)
    models = g.get("models")
    if not isinstance(models, list) or not models:
        raise err("genome.models", "must be a non-empty list of models")
    models = [_model(m, f"genome.models[{i}]", base_dir, err) for i, m in enumerate(models)]
    if len(set(models)) != len(models):
        raise err("genome.models", "lists a model twice")
    kind = g.get("kind", "parameters")
    if kind not in GENOME_KINDS:
        raise err("genome.kind", f"unknown kind {kind!r} (use {', '.join(GENOME_KINDS)})")
    if kind == "dataflow":
        return _dataflow_genome(g, models, base_dir, err)
    if "dataflow" in g and kind != "both":
        raise err("genome.dataflow", "only with genome.kind: dataflow or both")
    dataflow = None
    if kind == "both":
        for key in BOTH_REFUSED_KEYS:
            if key in g:
                raise err(f"genome.{key}", "not supported with kind: both (the layer path mixes the inputs' "
                                           "layers with the in-memory merged model's: the models must share a "
                                           "vocabulary)")
        base = g.get("base_model")
        named = models + ([_model(base, "genome.base_model", base_dir, err)] if base is not None else [])
        if BOTH_STAGE in named:
            raise err("genome.models" if BOTH_STAGE in models else "genome.base_model",
                      f"{BOTH_STAGE!r} names the parameter-merged model with kind: both (give the model's path "
                      f"as ./{BOTH_STAGE})")
        dataflow = _dataflow_section(g, err)
    if "merge_method" not in g:
        raise err("genome.merge_method", "missing")
    if not isinstance(g["merge_method"], str):
        raise err("genome.merge_method", "must be a string")
    try:
        method = get_method(g["merge_method"])
    except UserError as e:
        raise err("genome.merge_method", str(e))
    base = _model(g["base_model"], "genome.base_model", base_dir, err) if g.get("base_model") is not None else None
    if method.base_model == "required" and base is None:
        raise err("genome.base_model", f"merge method {method.name!r} needs a base_model")
    if method.max_inputs == 1:
        raise err("genome.merge_method", f"merge method {method.name!r} takes one model: nothing to search")

    tokenizer_source, tokenizer, chat_template = _tokenizer_settings(g, base_dir, err)

    gran = g.get("layer_granularity", 0)
    gran = 0 if gran is None else _int(gran, "genome.layer_granularity", err, minimum=0)
    normalize = g.get("normalize")
    if normalize is not None:
        normalize = _bool(normalize, "genome.normalize", err)
    filters = _str_list(g.get("filters"), "genome.filters", err)
    if len(set(filters)) != len(filters):
        raise err("genome.filters", "lists a filter twice")

    searched: dict[str, Bounds] = {}
    fixed: dict[str, Any] = {}
    params = g.get("parameters") or {}
    if not isinstance(params, dict):
        raise err("genome.parameters", "must be a mapping of parameter names to bounds or values")
    known = {p.name: p for p in method.params}
    for name, spec in params.items():
        key = f"genome.parameters.{name}"
        p = known.get(name)
        if p is None:
            raise err(key, f"merge method {method.name!r} takes no parameter {name!r} "
                           f"(takes: {', '.join(sorted(known)) or 'none'})")
        if isinstance(spec, dict):
            _no_unknown(spec, BOUND_KEYS, key, err)
            if p.kind is bool:
                raise err(key, "a true/false parameter cannot be searched; give it a value")
            if "min" not in spec or "max" not in spec:
                raise err(key, "give both min and max to search it (or a value to fix it)")
            lo = _float(spec["min"], f"{key}.min", err)
            hi = _float(spec["max"], f"{key}.max", err)
            if not lo < hi:
                raise err(key, f"min ({lo}) must be below max ({hi})")
            init = spec.get("init")
            if init is not None:
                init = _float(init, f"{key}.init", err)
                if not lo <= init <= hi:
                    raise err(f"{key}.init", f"{init} is outside [{lo}, {hi}]")
            searched[name] = Bounds(lo, hi, init)
        else:
            fixed[name] = spec
    if normalize is None and method.name in NORMALIZED_BY_DEFAULT:
        normalize = True  # mergekit-evolve's default for these methods
    if normalize is not None and "normalize" in known and "normalize" not in fixed:
        fixed["normalize"] = normalize

    return GenomeConfig(
        models=models, merge_method=method.name, base_model=base, tokenizer_source=tokenizer_source,
        tokenizer=tokenizer, chat_template=chat_template, layer_granularity=gran, normalize=normalize,
        allow_negative_weights=_bool(g.get("allow_negative_weights", False), "genome.allow_negative_weights", err),
        smooth=_bool(g.get("smooth", False), "genome.smooth", err), filters=filters, searched=searched,
        fixed=fixed, dtype=_dtype(g, "dtype", err), out_dtype=_dtype(g, "out_dtype", err), kind=kind,
        dataflow=dataflow,
    )


def _tokenizer_settings(g: dict, base_dir: str, err) -> tuple:
    """(tokenizer_source, tokenizer, chat_template) of the genome, as in a recipe."""
    tokenizer_source = g.get("tokenizer_source")
    if tokenizer_source is not None:
        if not isinstance(tokenizer_source, str):
            raise err("genome.tokenizer_source", "must be 'union', 'base' or a model")
        if tokenizer_source not in ("union", "base"):
            tokenizer_source = resolve_path(tokenizer_source, base_dir)
    tokenizer = g.get("tokenizer")
    if tokenizer is not None and not isinstance(tokenizer, dict):
        raise err("genome.tokenizer", "must be a mapping (as in a recipe)")
    chat_template = g.get("chat_template")
    if chat_template is not None and not isinstance(chat_template, str):
        raise err("genome.chat_template", "must be a string")
    return tokenizer_source, tokenizer, chat_template


def _dtype(g: dict, key: str, err) -> Optional[str]:
    v = g.get(key)
    if v is None:
        return None
    v = DTYPE_ALIASES.get(str(v), str(v))
    if v not in DTYPES:
        raise err(f"genome.{key}", f"unknown dtype {g.get(key)!r} (use one of {', '.join(DTYPES)})")
    return v


def _dataflow_genome(g: dict, models: list[str], base_dir: str, err) -> GenomeConfig:
    """``genome`` with ``kind: dataflow``: models, the ``dataflow`` section, dtype and tokenizer settings."""
    for key in PARAMETER_ONLY_KEYS:
        if key in g:
            raise err(f"genome.{key}", "not used by kind: dataflow (list a model under genome.models to use "
                                       "its layers)" if key == "base_model" else "not used by kind: dataflow")
    method = g.get("merge_method", "passthrough")
    if method != "passthrough":
        raise err("genome.merge_method", "kind: dataflow writes passthrough recipes (leave merge_method out, "
                                         "or use kind: both to search a merge too)")
    df = _dataflow_section(g, err)
    tokenizer_source, tokenizer, chat_template = _tokenizer_settings(g, base_dir, err)

    return GenomeConfig(models=models, merge_method="passthrough", tokenizer_source=tokenizer_source,
                        tokenizer=tokenizer, chat_template=chat_template, dtype=_dtype(g, "dtype", err),
                        out_dtype=_dtype(g, "out_dtype", err), kind="dataflow", dataflow=df)


def _dataflow_section(g: dict, err) -> DataflowConfig:
    """``genome.dataflow`` (kind: dataflow or both), with its defaults."""
    d = _mapping(g.get("dataflow"), "genome.dataflow", err)
    _no_unknown(d, DATAFLOW_KEYS, "genome.dataflow", err)
    df = DataflowConfig(
        max_layers=_opt_int(d.get("max_layers"), "genome.dataflow.max_layers", err, minimum=1),
        repeats=_int(d.get("repeats", 2), "genome.dataflow.repeats", err, minimum=1))
    scale = d.get("scale")
    key = "genome.dataflow.scale"
    if isinstance(scale, dict):
        _no_unknown(scale, BOUND_KEYS, key, err)
        if "min" not in scale or "max" not in scale:
            raise err(key, "give both min and max to search it (or a value to fix it)")
        lo, hi = _float(scale["min"], f"{key}.min", err), _float(scale["max"], f"{key}.max", err)
        if not 0 <= lo < hi:
            raise err(key, f"needs 0 <= min < max, got [{lo}, {hi}]")
        init = _float(scale.get("init", min(max(1.0, lo), hi)), f"{key}.init", err)
        if not lo <= init <= hi:
            raise err(f"{key}.init", f"{init} is outside [{lo}, {hi}]")
        df.scale = Bounds(lo, hi, init)
    elif scale is not None:
        v = _float(scale, key, err)
        if v < 0:
            raise err(key, "must not be negative")
        df.scale = Bounds(v, v, v)
    if "scale_filters" in d:
        df.scale_filters = _str_list(d["scale_filters"], "genome.dataflow.scale_filters", err)
        if not df.scale_filters:
            raise err("genome.dataflow.scale_filters", "must name the tensors that write into the residual "
                                                       "stream (o_proj, down_proj for Llama)")
    return df


def _resolved_genome_raw(raw: dict, g: GenomeConfig) -> dict:
    out = dict(raw)
    out["models"] = list(g.models)
    if g.base_model is not None:
        out["base_model"] = g.base_model
    if g.tokenizer_source is not None:
        out["tokenizer_source"] = g.tokenizer_source
    return out


def _tasks(tasks: Any, err) -> list[TaskConfig]:
    if not isinstance(tasks, list) or not tasks:
        raise err("tasks", "must be a non-empty list of lm-eval tasks")
    out = []
    for i, t in enumerate(tasks):
        key = f"tasks[{i}]"
        if isinstance(t, str):
            t = {"name": t}
        if not isinstance(t, dict):
            raise err(key, "must be a task name or a mapping with name, weight, metric")
        _no_unknown(t, TASK_KEYS, key, err)
        name = t.get("name")
        if not isinstance(name, str) or not name:
            raise err(f"{key}.name", "missing")
        metric = t.get("metric", "acc,none")
        if not isinstance(metric, str) or not metric:
            raise err(f"{key}.metric", "must be a metric key such as 'acc,none'")
        out.append(TaskConfig(name=name, weight=_float(t.get("weight", 1.0), f"{key}.weight", err), metric=metric))
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise err("tasks", "lists a task twice")
    return out


def _evaluation(ev: dict, base_dir: str, err) -> EvalConfig:
    backend = ev.get("backend", "hf")
    if backend not in BACKENDS:
        raise err("evaluation.backend", f"unknown backend {backend!r} (use {' or '.join(BACKENDS)})")
    batch_size = ev.get("batch_size", 32)
    if not (batch_size == "auto" or (isinstance(batch_size, int) and not isinstance(batch_size, bool)
                                     and batch_size > 0)):
        raise err("evaluation.batch_size", f"must be a positive integer or 'auto', got {batch_size!r}")
    limit = ev.get("limit")
    if limit is not None:
        limit = _float(limit, "evaluation.limit", err, positive=True)
        if limit >= 1:
            if limit != int(limit):
                raise err("evaluation.limit", "must be a whole number of examples or a fraction below 1")
            limit = int(limit)
    dtype = ev.get("dtype", "float32")
    if dtype not in ("float32", "float16", "bfloat16", "auto"):
        raise err("evaluation.dtype", f"unknown dtype {dtype!r} (float32, float16, bfloat16 or auto)")
    device = ev.get("device", "auto")
    if not isinstance(device, str) or not (device in ("auto", "cpu") or device.startswith("cuda")):
        raise err("evaluation.device", f"must be auto, cpu or cuda[:N], got {device!r}")
    merge_device = ev.get("merge_device", "cpu")
    if not isinstance(merge_device, str) or not (merge_device in ("auto", "cpu") or merge_device.startswith("cuda")):
        raise err("evaluation.merge_device", f"must be auto, cpu or cuda[:N], got {merge_device!r}")
    lm_eval = _mapping(ev.get("lm_eval"), "evaluation.lm_eval", err)
    for k in lm_eval:
        if k in RESERVED_LM_EVAL:
            where = "evaluation.model_args" if k == "model_args" else f"evaluation.{k}"
            raise err(f"evaluation.lm_eval.{k}", f"set by ray-merge; use {where}" if k in EVAL_KEYS or
                      k == "model_args" else "set by ray-merge")
        if k not in LM_EVAL_ARGS:
            raise err(f"evaluation.lm_eval.{k}", f"not an lm-eval option ray-merge passes on (known: "
                                                 f"{', '.join(LM_EVAL_ARGS)})")
    num_gpus = ev.get("num_gpus")
    if num_gpus is not None:
        num_gpus = _float(num_gpus, "evaluation.num_gpus", err)
        if num_gpus < 0:
            raise err("evaluation.num_gpus", "must not be negative")
    include = [resolve_path(p, base_dir) for p in _str_list(ev.get("include_paths"), "evaluation.include_paths", err)]
    for i, p in enumerate(include):
        if not os.path.isdir(p):
            raise err(f"evaluation.include_paths[{i}]", f"no such directory: {p}")
    vllm_python = ev.get("vllm_python")
    if vllm_python is not None and not isinstance(vllm_python, str):
        raise err("evaluation.vllm_python", "must be a path to a python executable")
    chat = ev.get("apply_chat_template", False)
    if not isinstance(chat, (bool, str)):
        raise err("evaluation.apply_chat_template", "must be true, false or a template name")
    sysinst = ev.get("system_instruction")
    if sysinst is not None and not isinstance(sysinst, str):
        raise err("evaluation.system_instruction", "must be a string")
    return EvalConfig(
        backend=backend,
        workers=_opt_int(ev.get("workers"), "evaluation.workers", err, minimum=1),
        num_cpus=_float(ev.get("num_cpus", 1.0), "evaluation.num_cpus", err, positive=True),
        num_gpus=num_gpus,
        device=device,
        merge_device=merge_device,
        dtype=dtype,
        batch_size=batch_size,
        limit=limit,
        num_fewshot=_opt_int(ev.get("num_fewshot"), "evaluation.num_fewshot", err, minimum=0),
        apply_chat_template=chat,
        fewshot_as_multiturn=_bool(ev.get("fewshot_as_multiturn", False), "evaluation.fewshot_as_multiturn", err),
        system_instruction=sysinst,
        include_paths=include,
        lm_eval=lm_eval,
        model_args=_mapping(ev.get("model_args"), "evaluation.model_args", err),
        vllm_python=vllm_python,
        in_flight=_int(ev.get("in_flight", 2), "evaluation.in_flight", err, minimum=1),
        score_inputs=_bool(ev.get("score_inputs", True), "evaluation.score_inputs", err),
        torch_threads=_opt_int(ev.get("torch_threads"), "evaluation.torch_threads", err, minimum=1),
        timeout_s=_opt_float(ev.get("timeout_s"), "evaluation.timeout_s", err),
    )


def _subsample(v: Any, seed: int, ev: EvalConfig, err) -> Optional[dict]:
    """``evaluation.subsample``, completed with its defaults (evolve.subsample)."""
    if v is None:
        return None
    key = "evaluation.subsample"
    d = _mapping(v, key, err)
    _no_unknown(d, SUBSAMPLE_KEYS, key, err)
    if "size" not in d:
        raise err(f"{key}.size", "missing (examples per task a candidate is scored on)")
    mode = d.get("mode", "per_generation")
    if mode not in SUBSAMPLE_MODES:
        raise err(f"{key}.mode", f"unknown mode {mode!r} (use {' or '.join(SUBSAMPLE_MODES)})")
    if "samples" in ev.lm_eval:
        raise err(key, "cannot be combined with evaluation.lm_eval.samples (both pick the examples)")
    return {"size": _int(d["size"], f"{key}.size", err, minimum=1), "mode": mode,
            "seed": _int(d.get("seed", seed), f"{key}.seed", err),
            "rescore_top": _int(d.get("rescore_top", 5), f"{key}.rescore_top", err, minimum=1),
            "rescore_every": _opt_int(d.get("rescore_every"), f"{key}.rescore_every", err, minimum=1)}


def check_benchmark_tasks(cfg: EvolveConfig, allowed: bool) -> None:
    """mergekit-evolve's guard: optimising against a common benchmark's test set needs an explicit flag."""
    if allowed:
        return
    for i, t in enumerate(cfg.tasks):
        if t.name.startswith(BENCHMARK_PREFIXES) and not t.name.endswith("_train"):
            raise UserError(f"{t.name} is a common benchmark: optimising against it games the benchmark; pass "
                            "--allow-benchmark-tasks (mergekit-evolve: --i-understand-the-depths-of-the-evils-"
                            "i-am-unleashing) to do it anyway", source=cfg.source, key=f"tasks[{i}]")
