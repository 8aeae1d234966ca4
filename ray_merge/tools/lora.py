"""LoRA extraction: a PEFT adapter approximating ``fine-tune - base`` by truncated SVD.

For each linear module the task vector ``W_ft - W_base`` (out x in) is factored as
``B @ A`` with ``A`` (r x in) and ``B`` (out x r) from its top-r singular triplets
(sqrt of the singular values on each side, as mergekit's default). Embeddings are
either factored too (``embed_lora``; PEFT's ``lora_embedding_A/B``, transposed) or
saved at full rank under ``modules_to_save``, as mergekit does. Other changed modules
(norms) are saved at full rank unless ``skip_undecomposable``. Where the output head
is tied to the input embedding (no weight of its own), it gets the same update as the
embedding, since PEFT wraps the two modules separately. Modules identical in both
models are left out; include/exclude regexes apply to embeddings too.

Work is one module at a time: two tensors are read (memory-mapped), the difference
is decomposed in float32 on the chosen device, and only the small factors are kept.
With Ray, each module is a task that reads the models itself and returns its factors;
the driver writes the adapter file.
"""
from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch

from ray_merge.errors import UserError
from ray_merge.execute.compute import tensor_seed
from ray_merge.execute.ray.session import (
    concurrency,
    ray_session,
    ray_wait_all,
    task_options,
)
from ray_merge.io.models import (
    ModelRef,
    TensorMeta,
    WeightReader,
    index_weights,
    read_config,
    resolve_model_dir,
)
from ray_merge.output.files import (
    OutTensor,
    abort_output,
    begin_output,
    finish_output,
    write_json,
    write_tensor_file,
)
from ray_merge.output.staging import package_versions
from ray_merge.planner.memory import memory_budget
from ray_merge.tools.common import note

log = logging.getLogger("ray_merge.lora")


ADAPTER_FILE = "adapter_model.safetensors"


REPORT_FILE = "ray_merge_lora_report.json"


@dataclass
class LoraOptions:
    max_rank: int = 128
    sv_epsilon: float = 0.0
    distribute_scale: bool = True
    embed_lora: bool = False
    modules_to_save: list[str] = field(default_factory=list)
    include_regexes: list[str] = field(default_factory=list)
    exclude_regexes: list[str] = field(default_factory=list)
    skip_undecomposable: bool = False
    lora_bias: Optional[bool] = None  # None: only when some bias changed
    svd: str = "auto"  # auto | full | lowrank
    device: str = "cpu"
    memory_budget: Optional[int] = None
    ray: Optional[object] = None  # a ray_merge.options.WorkerSpec: decompose modules as Ray tasks
    verbose: int = 0
    trust_remote_code: bool = False
    quiet: bool = False


@dataclass
class LoraJob:
    """One module whose task vector is factored."""

    module: str
    kind: str  # linear | conv1d | embedding
    weight: str
    bias: Optional[str]
    base_bias: bool  # the base model has the bias tensor too
    shape: tuple  # of the weight
    in_bytes: int  # both inputs
    tied: Optional[str] = None  # an output head sharing this (input embedding) weight

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """Shape of the matrix that is factored as B @ A (out x in, PEFT's orientation)."""
        a, b = self.shape
        return (b, a) if self.kind in ("embedding", "conv1d") else (a, b)


@dataclass
class LoraResult:
    module: str
    kind: str
    a: Optional[torch.Tensor]  # None: unchanged module
    b: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]  # bias delta, when the module has a bias
    rank: int
    rel_error: float
    norm: float
    svd: str


@dataclass
class ExtractionPlan:
    jobs: list[LoraJob]
    saves: list[tuple[str, list[tuple[str, str]]]]  # (module, [(tensor, source tensor)]) saved at full rank
    auto_saves: set  # modules added to modules_to_save by default (skipped when unchanged)
    modules_to_save: list[str]
    notes: list[str]
    all_modules: list[str] = field(default_factory=list)
    base_vocab: Optional[int] = None
    ft_vocab: Optional[int] = None


@dataclass
class LoraSummary:
    out_path: str
    results: list[LoraResult]
    saved: list[str]
    skipped_unchanged: list[str]
    config: dict
    by_type: dict
    seconds: float


# ---------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------


def module_table(model_dir: str, index: dict[str, TensorMeta], trust_remote_code: bool = False
                 ) -> list[tuple[str, str, Optional[str]]]:
    """(module name, kind, role) for every module with its own weight.

    kind: linear, conv1d (GPT-2 style, transposed), embedding or other; role: "input"
    (the token embedding), "head" (the output embedding), "embed" (other embeddings)
    or None. Kinds come from a weightless (meta-device) instance of the model's
    transformers class; when it cannot be built they are guessed from tensor names.
    """
    try:
        import transformers

        cfg = transformers.AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        prev = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            with torch.device("meta"):
                try:
                    model = transformers.AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
                except ValueError:
                    model = transformers.AutoModel.from_config(cfg, trust_remote_code=trust_remote_code)
        finally:
            transformers.logging.set_verbosity(prev)
    except Exception as e:  # unknown architecture, remote code refused, ...
        log.info("cannot instantiate the model class (%s); guessing module kinds from tensor names", e)
        return _guess_modules(index)

    from transformers.pytorch_utils import Conv1D

    inp, head = model.get_input_embeddings(), _output_embeddings(model)
    table = []
    for name, module in model.named_modules():
        if not name or "weight" not in module._parameters or module._parameters["weight"] is None:
            continue
        if isinstance(module, torch.nn.Embedding):
            kind = "embedding"
        elif isinstance(module, torch.nn.Linear):
            kind = "linear"
        elif isinstance(module, Conv1D):
            kind = "conv1d"
        else:
            kind = "other"
        role = "input" if module is inp else "head" if module is head else "embed" if kind == "embedding" else None
        table.append((name, kind, role))
    return table


def _output_embeddings(model):
    try:
        return model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None


_INPUT_HINTS = ("embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embed_in")


def _guess_modules(index: dict[str, TensorMeta]) -> list[tuple[str, str, Optional[str]]]:
    table = []
    names = [n[: -len(".weight")] for n in index if n.endswith(".weight")]
    if not any(n.split(".")[-1] in ("lm_head", "embed_out") for n in names):
        names.append("lm_head")  # tied to the input embedding
    for module in names:
        meta = index.get(module + ".weight")
        key = module.split(".")[-1]
        if any(h in module for h in _INPUT_HINTS):
            table.append((module, "embedding", "input"))
        elif "embed" in key or key == "wpe":
            table.append((module, "embedding", "embed"))
        elif key in ("lm_head", "embed_out"):
            table.append((module, "linear", "head"))
        elif meta is not None and len(meta.shape) == 2:
            table.append((module, "linear", None))
        else:
            table.append((module, "other", None))
    return table


def _compile(patterns: list[str], flag: str) -> list[re.Pattern]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise UserError(f"{flag} {p!r} is not a valid regular expression: {e}")
    return out


def plan_extraction(table, ft_index: dict[str, TensorMeta], base_index: dict[str, TensorMeta],
                    opts: LoraOptions) -> ExtractionPlan:
    include = _compile(opts.include_regexes, "--include-regex")
    exclude = _compile(opts.exclude_regexes, "--exclude-regex")
    notes: list[str] = []
    modules_to_save = list(dict.fromkeys(opts.modules_to_save))
    explicit = set(modules_to_save)
    embed_lora = opts.embed_lora

    inputs = [n for n, _, role in table if role == "input" and n + ".weight" in ft_index]
    input_embed = inputs[0] if inputs else None
    heads = [n for n, _, role in table if role == "head"]
    # an output head without its own weight is tied to the input embedding
    tied_head = heads[0] if heads and input_embed and heads[0] + ".weight" not in ft_index else None

    ft_vocab = base_vocab = None
    if input_embed:
        w = input_embed + ".weight"
        ft_vocab = ft_index[w].shape[0]
        if w in base_index:
            base_vocab = base_index[w].shape[0]
    if ft_vocab is not None and base_vocab is not None and ft_vocab != base_vocab:
        notes.append(f"vocabulary sizes differ (fine-tune {ft_vocab}, base {base_vocab}): embeddings are saved "
                     "at full rank; resize the base model's embeddings before loading the adapter")
        embed_lora = False

    def selected(name: str) -> bool:
        if include and not any(p.search(name) for p in include):
            return False
        return not any(p.search(name) for p in exclude)

    jobs: list[LoraJob] = []
    saves: list[tuple[str, list[tuple[str, str]]]] = []
    auto_saves: set = set()
    missing: list[str] = []
    warned_kinds: set = set()
    embed_noted = False
    # GPT-2 style Conv1D modules are factored only when no Linear module is (one fan_in_fan_out per adapter)
    kinds = {kind for name, kind, role in table if name + ".weight" in ft_index and selected(name) and not role}

    def save(name: str, sources: list[tuple[str, str]], key: str, auto: bool) -> None:
        if key not in modules_to_save:
            modules_to_save.append(key)
            if auto:
                auto_saves.add(key)
        saves.append((name, sources))

    for name, kind, role in table:
        weight = name + ".weight"
        key = name.split(".")[-1]
        if weight not in ft_index:
            if name != tied_head:
                missing.append(name)  # stored under another name
            continue
        bias = name + ".bias" if name + ".bias" in ft_index else None
        sources = [(weight, weight)] + ([(bias, bias)] if bias else [])
        is_embed = role is not None
        if is_embed and not embed_lora and selected(name):
            if key not in modules_to_save:
                modules_to_save.append(key)
                auto_saves.add(key)
                if not embed_noted:
                    notes.append("embeddings are saved at full rank in modules_to_save "
                                 "(use --embed-lora to factor them, or --exclude-regex to leave them out)")
                    embed_noted = True
        if name in modules_to_save or key in modules_to_save:
            saves.append((name, sources))
            if name == input_embed and tied_head:
                # the head shares this weight in the model, but PEFT wraps it separately
                save(tied_head, [(tied_head + ".weight", weight)], tied_head.split(".")[-1], key in auto_saves)
            continue
        if not selected(name):
            continue
        decomposable = kind in ("linear", "embedding") or (kind == "conv1d" and "linear" not in kinds)
        if decomposable and len(ft_index[weight].shape) != 2:
            decomposable = False
        if not decomposable:
            if kind == "conv1d" and key not in warned_kinds:
                notes.append(f"{key}: Conv1D next to Linear modules cannot share one PEFT config; "
                             + ("skipped" if opts.skip_undecomposable else "saved at full rank"))
                warned_kinds.add(key)
            if not opts.skip_undecomposable:
                save(name, sources, key, True)
            continue
        if weight not in base_index:
            raise UserError(f"tensor {weight} is in the fine-tuned model but not in the base model")
        if base_index[weight].shape != ft_index[weight].shape:
            raise UserError(f"tensor {weight} has shape {list(ft_index[weight].shape)} in the fine-tuned model "
                            f"but {list(base_index[weight].shape)} in the base model")
        in_bytes = ft_index[weight].nbytes + base_index[weight].nbytes
        jobs.append(LoraJob(module=name, kind=kind, weight=weight, bias=bias,
                            base_bias=bool(bias and bias in base_index), shape=tuple(ft_index[weight].shape),
                            in_bytes=in_bytes, tied=tied_head if name == input_embed else None))
    if missing:
        log.info("no weights in the checkpoint for %d module(s): %s", len(missing), ", ".join(missing[:5]))
    for key in explicit:
        if not any(n == key or n.endswith("." + key) for n, _, _ in table):
            raise UserError(f"--save-module {key!r}: the model has no such module")
    if not jobs and not saves:
        raise UserError("no modules selected for extraction (check --include-regex / --exclude-regex)")
    return ExtractionPlan(jobs=jobs, saves=saves, auto_saves=auto_saves, modules_to_save=modules_to_save,
                          notes=notes, all_modules=[n for n, _, _ in table], base_vocab=base_vocab,
                          ft_vocab=ft_vocab)


# ---------------------------------------------------------------------------
# Decomposition (runs in the driver or in a Ray task)
# ---------------------------------------------------------------------------


def svd_working_bytes(job: LoraJob, method: str, max_rank: int) -> int:
    m, n = job.matrix_shape
    k = min(m, n)
    if method == "full":
        return job.in_bytes + 4 * (2 * m * n + m * k + k * n + k)
    q = min(k, max_rank + 10)
    return job.in_bytes + 4 * (2 * m * n + 3 * (m + n) * q)


def choose_svd(job: LoraJob, opts: LoraOptions, budget: int) -> str:
    full = svd_working_bytes(job, "full", opts.max_rank)
    low = svd_working_bytes(job, "lowrank", opts.max_rank)
    if opts.svd == "full" or (opts.svd == "auto" and full <= budget):
        if full > budget:
            raise UserError(f"module {job.module} needs {full / 2**30:.2f} GiB for a full SVD, more than the "
                            f"memory budget of {budget / 2**30:.2f} GiB (try --svd lowrank)")
        return "full"
    if low > budget:
        raise UserError(f"module {job.module} needs {low / 2**30:.2f} GiB to decompose, more than the memory "
                        f"budget of {budget / 2**30:.2f} GiB")
    if opts.svd == "auto":
        log.info("%s: full SVD does not fit the memory budget; using a randomized low-rank SVD", job.module)
    return "lowrank"


_READERS: dict[str, WeightReader] = {}


def _reader(model_dir: str, ref: str) -> WeightReader:
    r = _READERS.get(model_dir)
    if r is None:
        if not os.path.isdir(model_dir):  # a Ray worker on another node: find (or fetch) it there
            model_dir = resolve_model_dir(ModelRef.parse(ref))
        r = WeightReader(index_weights(model_dir, ref))
        _READERS[model_dir] = r
    return r


def decompose(job: LoraJob, ft: tuple[str, str], base: tuple[str, str], *, max_rank: int, sv_epsilon: float,
              distribute_scale: bool, svd: str, device: str, out_dtype: str) -> LoraResult:
    """Factor one module's task vector. ``ft`` and ``base`` are (directory, reference)."""

    ft_r, base_r = _reader(*ft), _reader(*base)
    with torch.no_grad():
        # reads may alias the memory-mapped file: never modify them in place
        delta = torch.sub(ft_r.read(job.weight).to(device=device, dtype=torch.float32),
                          base_r.read(job.weight).to(device=device, dtype=torch.float32))
        if job.kind in ("embedding", "conv1d"):
            delta = delta.T
        bias = None
        if job.bias:
            bias = ft_r.read(job.bias).to(torch.float32)
            if job.base_bias:
                bias = bias - base_r.read(job.bias).to(torch.float32)
        norm = float(torch.linalg.matrix_norm(delta))
        if norm == 0.0:
            return LoraResult(job.module, job.kind, None, None, bias, 0, 0.0, 0.0, "none")
        m, n = delta.shape
        k = min(m, n)
        cap = min(max_rank, k)
        if svd == "full":
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        else:
            q = min(k, cap + 10)
            devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(tensor_seed(0, job.module))
                u, s, v = torch.svd_lowrank(delta, q=q, niter=4)
            vh = v.T
        del delta
        rank = cap
        if sv_epsilon > 0:
            rank = min(rank, int((s > sv_epsilon).sum()))
        rank = max(1, min(rank, s.shape[0]))
        top = s[:rank].double()
        if svd == "full":  # the tail singular values give the residual without cancellation
            tail = s[rank:].double()
            rel_error = math.sqrt(float((tail * tail).sum()) / float((s.double() ** 2).sum()))
        else:
            rel_error = math.sqrt(max(norm * norm - float((top * top).sum()), 0.0)) / norm
        if distribute_scale:
            root = top.sqrt().to(torch.float32)
            a = root[:, None] * vh[:rank]
            b = u[:, :rank] * root[None, :]
        else:
            a = top.to(torch.float32)[:, None] * vh[:rank]
            b = u[:, :rank]
        dtype = getattr(torch, out_dtype)
        return LoraResult(job.module, job.kind, a.to("cpu", dtype).contiguous(), b.to("cpu", dtype).contiguous(),
                          bias, rank, rel_error, norm, svd)


# ---------------------------------------------------------------------------
# The whole extraction
# ---------------------------------------------------------------------------


def _resolve(value: str, flag: str) -> tuple[ModelRef, str]:
    if not value or not str(value).strip():
        raise UserError(f"{flag} needs a model path or hub id")
    ref = ModelRef.parse(value)
    path = resolve_model_dir(ref)
    read_config(path, str(ref))
    return ref, path


def extract_lora(model: str, base_model: str, out_path: str, opts: LoraOptions) -> LoraSummary:
    """Extract a PEFT LoRA adapter for ``model`` relative to ``base_model`` into ``out_path``."""

    start = time.time()
    if opts.max_rank < 1:
        raise UserError(f"--max-rank must be at least 1, got {opts.max_rank}")
    if opts.sv_epsilon < 0:
        raise UserError(f"--sv-epsilon must be >= 0, got {opts.sv_epsilon}")
    if opts.svd not in ("auto", "full", "lowrank"):
        raise UserError(f"--svd must be auto, full or lowrank, got {opts.svd!r}")
    if opts.ray is not None and opts.ray.workers is not None and opts.ray.workers < 1:
        raise UserError(f"--workers must be at least 1, got {opts.ray.workers}")
    ft_ref, ft_dir = _resolve(model, "--model")
    base_ref, base_dir = _resolve(base_model, "--base-model")
    ft_type = read_config(ft_dir, str(ft_ref)).get("model_type")
    base_type = read_config(base_dir, str(base_ref)).get("model_type")
    if ft_type != base_type:
        note(f"the fine-tuned model is a {ft_type} model but the base model is a {base_type} model", opts.quiet)
    ft_index = index_weights(ft_dir, str(ft_ref))
    base_index = index_weights(base_dir, str(base_ref))
    table = module_table(ft_dir, ft_index, opts.trust_remote_code)
    plan = plan_extraction(table, ft_index, base_index, opts)
    for msg in plan.notes:
        note(msg, opts.quiet)

    budget = memory_budget(opts.memory_budget)
    methods = {j.module: choose_svd(j, opts, budget) for j in plan.jobs}
    out_dtype = _factor_dtype(ft_index, plan.jobs)

    stage = begin_output(out_path)
    try:
        results = _run_jobs(plan.jobs, methods, (ft_dir, str(ft_ref)), (base_dir, str(base_ref)), opts, budget,
                            out_dtype)
        summary = _write_adapter(stage, out_path, plan, results, ft_dir, str(ft_ref), base_dir, str(base_ref),
                                 opts, start)
        finish_output(stage, out_path)
    except BaseException:
        abort_output(stage)
        raise
    return summary


def _factor_dtype(ft_index: dict[str, TensorMeta], jobs: list[LoraJob]) -> str:
    for j in jobs:
        dt = ft_index[j.weight].dtype
        if dt.is_floating_point and dt.itemsize >= 2:
            return str(dt).removeprefix("torch.")
    return "float32"


def _run_jobs(jobs: list[LoraJob], methods: dict[str, str], ft, base, opts: LoraOptions, budget: int,
              out_dtype: str) -> list[LoraResult]:
    from tqdm.auto import tqdm

    kw = dict(max_rank=opts.max_rank, sv_epsilon=opts.sv_epsilon, distribute_scale=opts.distribute_scale,
              device=opts.device, out_dtype=out_dtype)
    results: dict[str, LoraResult] = {}
    bar = tqdm(total=len(jobs), desc="extracting", unit="module", disable=opts.quiet)
    try:
        if opts.ray is None:
            for job in jobs:
                results[job.module] = decompose(job, ft, base, svd=methods[job.module], **kw)
                bar.update(1)
        else:
            spec = opts.ray
            with ray_session(spec, opts.verbose) as ray:
                task = ray.remote(decompose).options(max_retries=1, **task_options(spec))
                # modules in flight: as many as can run, twice over (so none waits on the driver), and on a
                # local instance no more than fit the memory budget at once
                peak = max((svd_working_bytes(j, methods[j.module], opts.max_rank) for j in jobs), default=1)
                limit = 2 * concurrency(ray, spec)
                if not spec.remote and not spec.memory:
                    limit = max(1, min(limit, budget // max(peak, 1)))
                queue = list(jobs)
                running: dict = {}

                def submit():
                    while queue and len(running) < limit:
                        job = queue.pop(0)
                        running[task.remote(job, ft, base, svd=methods[job.module], **kw)] = job

                def done(ref, value):
                    running.pop(ref, None)
                    results[value.module] = value
                    bar.update(1)
                    submit()

                submit()
                while running:
                    ray_wait_all(ray, list(running), done)
    finally:
        bar.close()
    return [results[j.module] for j in jobs]


def _write_adapter(stage: str, out_path: str, plan: ExtractionPlan, results: list[LoraResult], ft_dir: str,
                   ft_ref: str, base_dir: str, base_ref: str, opts: LoraOptions, start: float) -> LoraSummary:
    ft_reader = _reader(ft_dir, ft_ref)
    base_reader = _reader(base_dir, base_ref)
    changed = [r for r in results if r.a is not None]
    unchanged = [r.module for r in results if r.a is None]
    for job, r in zip(plan.jobs, results):
        if job.tied and r.a is not None:
            # a head tied to the factored embedding gets the same update, as a Linear LoRA
            changed.append(LoraResult(job.tied, "linear", r.b.T.contiguous(), r.a.T.contiguous(), None, r.rank,
                                      r.rel_error, r.norm, r.svd))
    if unchanged:
        note(f"{len(unchanged)} module(s) identical in both models were left out", opts.quiet)

    has_embed_lora = any(r.kind == "embedding" for r in changed)
    bias_changed = any(r.bias is not None and bool(torch.any(r.bias != 0)) for r in changed)
    lora_bias = opts.lora_bias if opts.lora_bias is not None else bias_changed
    if lora_bias and has_embed_lora:
        note("bias changes are dropped: PEFT cannot combine lora_bias with embedding LoRA", opts.quiet)
        lora_bias = False
    elif bias_changed and not lora_bias:
        note("bias changes are dropped (--no-lora-bias)", opts.quiet)
    elif lora_bias:
        note("some biases changed: the adapter uses lora_bias (PEFT >= 0.14)", opts.quiet)

    tensors: list[OutTensor] = []
    for r in changed:
        if r.kind == "embedding":
            names = (f"base_model.model.{r.module}.lora_embedding_A", f"base_model.model.{r.module}.lora_embedding_B")
        else:
            names = (f"base_model.model.{r.module}.lora_A.weight", f"base_model.model.{r.module}.lora_B.weight")
        tensors.append(OutTensor(names[0], tuple(r.a.shape), _dt(r.a), (lambda t=r.a: t)))
        tensors.append(OutTensor(names[1], tuple(r.b.shape), _dt(r.b), (lambda t=r.b: t)))
        if lora_bias:
            out_features = r.b.shape[0]
            bias = r.bias if r.bias is not None else torch.zeros(out_features)
            tensors.append(OutTensor(f"base_model.model.{r.module}.lora_B.bias", (out_features,), _dt(r.b),
                                     (lambda t=bias: t)))

    saved: list[str] = []
    skipped_same: list[str] = []
    for module, sources in plan.saves:
        key = module.split(".")[-1]
        if key in plan.auto_saves and _same(ft_reader, base_reader, [src for _, src in sources]):
            skipped_same.append(module)
            continue
        saved.append(module)
        for name, src in sources:
            meta = ft_reader.index[src]
            tensors.append(OutTensor(f"base_model.model.{name}", meta.shape, str(meta.dtype).removeprefix("torch."),
                                     (lambda n=src: ft_reader.read(n))))
    if skipped_same:
        note(f"{len(skipped_same)} full-rank module(s) identical in both models were left out", opts.quiet)
    if not tensors:
        raise UserError("the two models are identical in every selected module; there is nothing to extract")

    write_tensor_file(os.path.join(stage, ADAPTER_FILE), tensors)

    saved_keys = list(dict.fromkeys(m.split(".")[-1] for m in saved))
    modules_to_save = [k for k in plan.modules_to_save if k in saved_keys]
    ranks = {r.module: r.rank for r in changed}
    r_max = max(ranks.values(), default=1)
    config = {
        "base_model_name_or_path": base_ref,
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r_max,
        "lora_alpha": r_max,
        "rank_pattern": {k: v for k, v in ranks.items() if v != r_max},
        "alpha_pattern": {k: v for k, v in ranks.items() if v != r_max},
        "target_modules": _target_modules([r.module for r in changed], plan),
        "modules_to_save": modules_to_save or None,
        "lora_dropout": 0.0,
        "fan_in_fan_out": any(r.kind == "conv1d" for r in changed),
        "bias": "none",
        "lora_bias": lora_bias,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    write_json(os.path.join(stage, "adapter_config.json"), config)

    by_type = _by_type(changed)
    report = {
        "model": ft_ref,
        "base_model": base_ref,
        "max_rank": opts.max_rank,
        "sv_epsilon": opts.sv_epsilon,
        "modules": {r.module: {"rank": r.rank, "rel_error": r.rel_error, "norm": r.norm, "svd": r.svd}
                    for r in changed},
        "by_type": by_type,
        "modules_to_save": saved,
        "unchanged": unchanged + skipped_same,
        "versions": package_versions(),
    }
    write_json(os.path.join(stage, REPORT_FILE), report)
    with open(os.path.join(stage, "README.md"), "w") as f:
        f.write(_card(ft_ref, base_ref, opts, by_type))
    return LoraSummary(out_path=os.path.abspath(out_path), results=results, saved=saved,
                       skipped_unchanged=unchanged + skipped_same, config=config, by_type=by_type,
                       seconds=time.time() - start)


def _dt(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _same(ft: WeightReader, base: WeightReader, names: list[str]) -> bool:
    for n in names:
        if n not in base.index or base.index[n].shape != ft.index[n].shape:
            return False
        if not torch.equal(ft.read(n), base.read(n)):
            return False
    return True


def _target_modules(modules: list[str], plan: ExtractionPlan) -> list[str]:
    """Module-name suffixes where they cover exactly the extracted modules, else full names."""
    candidates = plan.all_modules
    extracted = set(modules)
    out: list[str] = []
    by_key: dict[str, list[str]] = defaultdict(list)
    for m in modules:
        by_key[m.split(".")[-1]].append(m)
    for key, members in by_key.items():
        matches = {c for c in candidates if c == key or c.endswith("." + key)}
        if matches <= extracted:
            out.append(key)
        else:
            out.extend(members)
    return sorted(out)


def _by_type(results: list[LoraResult]) -> dict:
    groups: dict[str, list[LoraResult]] = defaultdict(list)
    for r in results:
        groups[r.module.split(".")[-1]].append(r)
    out = {}
    for key in sorted(groups):
        rs = groups[key]
        # error of the whole group: sqrt(sum residual^2 / sum norm^2)
        res2 = sum((r.rel_error * r.norm) ** 2 for r in rs)
        tot2 = sum(r.norm ** 2 for r in rs)
        out[key] = {
            "modules": len(rs),
            "rank_min": min(r.rank for r in rs),
            "rank_max": max(r.rank for r in rs),
            "rel_error_mean": sum(r.rel_error for r in rs) / len(rs),
            "rel_error_max": max(r.rel_error for r in rs),
            "rel_error_total": math.sqrt(res2 / tot2) if tot2 else 0.0,
        }
    return out


def format_report(summary: LoraSummary) -> str:
    lines = [f"{'module type':<22} {'count':>5} {'rank':>9} {'rel. error mean':>16} {'max':>9}"]
    for key, g in summary.by_type.items():
        rank = str(g["rank_max"]) if g["rank_min"] == g["rank_max"] else f"{g['rank_min']}-{g['rank_max']}"
        lines.append(f"{key:<22} {g['modules']:>5} {rank:>9} {g['rel_error_mean']:>16.4g} {g['rel_error_max']:>9.4g}")
    changed = [r for r in summary.results if r.a is not None]
    res2 = sum((r.rel_error * r.norm) ** 2 for r in changed)
    tot2 = sum(r.norm ** 2 for r in changed)
    if tot2:
        lines.append(f"{'all factored modules':<22} {len(changed):>5} {'':>9} "
                     f"{'(total) ' + format(math.sqrt(res2 / tot2), '.4g'):>16}")
    if summary.saved:
        lines.append(f"full rank (modules_to_save): {len(summary.saved)} module(s)")
    return "\n".join(lines)


def _card(ft_ref: str, base_ref: str, opts: LoraOptions, by_type: dict) -> str:
    rows = "\n".join(f"| {k} | {g['modules']} | {g['rank_max']} | {g['rel_error_mean']:.4g} |"
                     for k, g in by_type.items())
    return f"""---
base_model: {base_ref}
library_name: peft
tags:
- ray-merge
- lora
---
# LoRA extracted from {ft_ref}

A PEFT LoRA adapter approximating the difference between `{ft_ref}` and its base `{base_ref}`,
extracted with `ray-merge extract-lora` (truncated SVD, max rank {opts.max_rank}).

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base_ref}"), "<this directory>")
```

| module | count | rank | relative error |
| --- | --- | --- | --- |
{rows}
"""


def main_summary_line(summary: LoraSummary) -> str:
    n = sum(1 for r in summary.results if r.a is not None)
    return (f"wrote a LoRA adapter ({n} factored module(s), {len(summary.saved)} at full rank) to "
            f"{summary.out_path} in {summary.seconds:.1f}s")


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `ray-merge extract-lora`")
