"""Mixture-of-experts assembly from dense models, in mergekit-moe's config format.

The base model gives embeddings, attention, norms and head; each expert model gives
the MLP of one expert in every layer; the router ("gate") of each layer is built
from prompts (``hidden``: the base model's hidden states; ``cheap_embed``: token
embeddings) or at random. Output architectures:

- Mixtral (from Llama/Mistral models): ``model.layers.N.block_sparse_moe.gate.weight``
  and ``...block_sparse_moe.experts.E.{w1,w2,w3}.weight`` (w1 = gate_proj, w2 = down_proj,
  w3 = up_proj), the layout of the published Mixtral checkpoints.
- Qwen2-MoE (from Qwen2/Llama/Mistral models, one shared expert):
  ``model.layers.N.mlp.gate.weight``, ``mlp.experts.E.{gate,up,down}_proj.weight``,
  ``mlp.shared_expert.*`` and ``mlp.shared_expert_gate.weight``.

Tensors are copied one at a time into streamed shards; only the base model is ever
loaded whole (for ``hidden`` gates).
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import yaml

from ray_merge.errors import UserError
from ray_merge.execute.compute import tensor_seed
from ray_merge.io.models import (
    ModelRef,
    WeightReader,
    index_weights,
    read_config,
    resolve_model_dir,
)
from ray_merge.io.quantized import unquantized_config
from ray_merge.output.files import (
    OutTensor,
    abort_output,
    begin_output,
    copy_model_extras,
    finish_output,
    write_json,
    write_sharded,
)
from ray_merge.output.staging import package_versions
from ray_merge.planner.architecture import infer_layout
from ray_merge.recipe.schema import DTYPE_ALIASES, DTYPES
from ray_merge.tools.common import note

log = logging.getLogger("ray_merge.moe")


GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")


MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


MIXTRAL_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


CONFIG_KEYS = {"base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture"}


EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"}


@dataclass
class Expert:
    source_model: ModelRef
    positive_prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)
    noise_scale: Optional[float] = None
    residual_scale: Optional[float] = None


@dataclass
class MoEConfig:
    base_model: ModelRef
    experts: list[Expert]
    gate_mode: str = "hidden"
    dtype: Optional[str] = None
    experts_per_token: int = 2
    shared_experts: list[Expert] = field(default_factory=list)
    architecture: Optional[str] = None
    source: str = "<moe config>"
    text: str = ""


@dataclass
class MoEOptions:
    device: str = "cpu"
    out_shard_bytes: int = 5_000_000_000
    random_seed: Optional[int] = None
    copy_tokenizer: bool = True
    write_model_card: bool = True
    allow_all_same: bool = False
    trust_remote_code: bool = False
    quiet: bool = False


@dataclass
class MoEResult:
    out: str
    architecture: str
    num_experts: int
    experts_per_token: int
    num_tensors: int
    config: dict
    seconds: float


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


def load_moe_config(path: str) -> MoEConfig:
    if not os.path.isfile(path):
        raise UserError("config file not found", source=path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        data = yaml.safe_load(text)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"malformed YAML: {' '.join(str(e).split())}", source=path)
    cfg = moe_config_from_dict(data, source=path)
    cfg.text = text
    return cfg


def moe_config_from_dict(data, source: str = "<moe config>") -> MoEConfig:
    def err(key: str, msg: str) -> UserError:
        return UserError(msg, source=source, key=key)

    if not isinstance(data, dict):
        raise UserError("an MoE config must be a mapping of keys", source=source)
    unknown = sorted(set(data) - CONFIG_KEYS)
    if unknown:
        raise err(unknown[0], f"unknown key (known: {', '.join(sorted(CONFIG_KEYS))})")
    if not isinstance(data.get("base_model"), str) or not data["base_model"].strip():
        raise err("base_model", "missing (a model path or hub id)")
    gate_mode = data.get("gate_mode", "hidden")
    if gate_mode not in GATE_MODES:
        raise err("gate_mode", f"unknown gate mode {gate_mode!r} (use one of {', '.join(GATE_MODES)})")
    experts = _experts(data.get("experts"), "experts", err, required=True)
    shared = _experts(data.get("shared_experts"), "shared_experts", err, required=False)
    if len(shared) > 1:
        raise err("shared_experts", "at most one shared expert is supported")
    ept = data.get("experts_per_token", 2)
    if not isinstance(ept, int) or isinstance(ept, bool) or ept < 1:
        raise err("experts_per_token", f"must be a positive integer, got {ept!r}")
    if ept > len(experts):
        raise err("experts_per_token", f"{ept} is more than the {len(experts)} expert(s)")
    dtype = data.get("dtype")
    if dtype is not None:
        dtype = DTYPE_ALIASES.get(str(dtype), str(dtype))
        if dtype not in DTYPES:
            raise err("dtype", f"unknown dtype {data['dtype']!r} (use one of {', '.join(DTYPES)})")
    arch = data.get("architecture")
    if arch is not None:
        if not isinstance(arch, str):
            raise err("architecture", "must be a string (mixtral or qwen)")
        arch = _arch_name(arch)
        if arch is None:
            raise err("architecture", f"unsupported output architecture {data['architecture']!r} "
                                      "(supported: mixtral, qwen)")
    if gate_mode not in ("random", "uniform_random"):
        for i, e in enumerate(experts):
            if not e.positive_prompts:
                raise err(f"experts[{i}].positive_prompts", f"gate_mode {gate_mode} needs prompts for every expert")
        first = (experts[0].positive_prompts, experts[0].negative_prompts)
        if len(experts) > 1 and all((e.positive_prompts, e.negative_prompts) == first for e in experts[1:]):
            raise err("experts", "every expert has the same prompts, so the router could not tell them apart")
        for i, e in enumerate(shared):
            if not e.positive_prompts:
                raise err(f"shared_experts[{i}].positive_prompts",
                          f"gate_mode {gate_mode} needs prompts for the shared expert")
    return MoEConfig(base_model=ModelRef.parse(data["base_model"]), experts=experts, gate_mode=gate_mode,
                     dtype=dtype, experts_per_token=ept, shared_experts=shared, architecture=arch, source=source)


def _arch_name(value: str) -> Optional[str]:
    v = value.strip().lower().replace("-", "").replace("_", "").replace(" ", "")
    if v.startswith("mixtral"):
        return "mixtral"
    if v in ("qwen", "qwenmoe", "qwen2", "qwen2moe", "qwen2moeforcausallm"):
        return "qwen2_moe"
    return None


def _experts(value, key: str, err, *, required: bool) -> list[Expert]:
    if value is None:
        if required:
            raise err(key, "missing (a list of experts with source_model)")
        return []
    if not isinstance(value, list) or (required and not value):
        raise err(key, "must be a non-empty list of experts")
    out = []
    for i, e in enumerate(value):
        k = f"{key}[{i}]"
        if isinstance(e, str):
            e = {"source_model": e}
        if not isinstance(e, dict):
            raise err(k, "must be a mapping with source_model")
        extra = sorted(set(e) - EXPERT_KEYS)
        if extra:
            raise err(f"{k}.{extra[0]}", f"unknown key (allowed: {', '.join(sorted(EXPERT_KEYS))})")
        if not isinstance(e.get("source_model"), str) or not e["source_model"].strip():
            raise err(f"{k}.source_model", "missing (a model path or hub id)")
        prompts = {}
        for pk in ("positive_prompts", "negative_prompts"):
            p = e.get(pk) or []
            if isinstance(p, str):
                p = [p]
            if not isinstance(p, list) or not all(isinstance(x, str) for x in p):
                raise err(f"{k}.{pk}", "must be a list of strings")
            prompts[pk] = p
        scales = {}
        for sk in ("noise_scale", "residual_scale"):
            v = e.get(sk)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise err(f"{k}.{sk}", f"must be a number, got {v!r}")
            scales[sk] = float(v) if v is not None else None
        out.append(Expert(ModelRef.parse(e["source_model"]), **prompts, **scales))
    return out


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


@dataclass
class _Model:
    ref: ModelRef
    path: str
    config: dict
    reader: WeightReader


def _open(ref: ModelRef, cache: dict) -> _Model:
    m = cache.get(ref)
    if m is None:
        path = resolve_model_dir(ref)
        m = _Model(ref, path, read_config(path, str(ref)), WeightReader(index_weights(path, str(ref))))
        cache[ref] = m
    return m


def _cfg(config: dict, key: str):
    if key in config:
        return config[key]
    text = config.get("text_config")
    return text.get(key) if isinstance(text, dict) else None


def select_architecture(cfg: MoEConfig, model_types: list[str]) -> str:
    kinds = set(model_types)
    if len(kinds) != 1:
        raise UserError(f"all models must have the same architecture, found {', '.join(sorted(kinds))}",
                        source=cfg.source)
    kind = model_types[0]
    arch = cfg.architecture or ("qwen2_moe" if cfg.shared_experts else "mixtral")
    if arch == "mixtral":
        if cfg.shared_experts:
            raise UserError("Mixtral has no shared experts; remove shared_experts or set architecture: qwen",
                            source=cfg.source, key="shared_experts")
        if kind not in ("llama", "mistral"):
            hint = " (Qwen2 models: set architecture: qwen and add one shared expert)" if kind == "qwen2" else ""
            raise UserError(f"Mixtral output needs Llama or Mistral models, not {kind}{hint}", source=cfg.source)
    else:
        if len(cfg.shared_experts) != 1:
            raise UserError("Qwen2-MoE output needs exactly one shared expert (shared_experts)",
                            source=cfg.source, key="shared_experts")
        if kind not in ("llama", "mistral", "qwen2"):
            raise UserError(f"Qwen2-MoE output needs Qwen2, Llama or Mistral models, not {kind}", source=cfg.source)
    return arch


# ---------------------------------------------------------------------------
# Router weights
# ---------------------------------------------------------------------------


def gate_vectors(cfg: MoEConfig, base: _Model, layout, num_layers: int, hidden: int, opts: MoEOptions
                 ) -> torch.Tensor:
    """(layers, experts + shared, hidden) router rows, float32."""
    experts = list(cfg.experts) + list(cfg.shared_experts)
    n = len(experts)
    g = torch.Generator().manual_seed(opts.random_seed or 0)
    if cfg.gate_mode == "random":
        return torch.randn((num_layers, n, hidden), generator=g)
    if cfg.gate_mode == "uniform_random":
        scale = math.sqrt(1.0 / hidden)
        return torch.rand((num_layers, n, hidden), generator=g) * 2 * scale - scale

    tokenizer = _tokenizer(base, opts)
    if cfg.gate_mode == "cheap_embed":
        name = next((t for t in layout.pre if t.endswith("embed_tokens.weight") or t.endswith("wte.weight")),
                    None) or next((t for t in layout.pre if "embed" in t), None)
        if name is None:
            raise UserError(f"model {base.ref}: no token embedding found for gate_mode cheap_embed")
        embed = base.reader.read(name)

        def encode(prompts: list[str]) -> torch.Tensor:
            tok = _tokenize(tokenizer, prompts)
            ids, mask = tok["input_ids"], tok["attention_mask"]
            h = (embed[ids].float() * mask.unsqueeze(-1)).sum(dim=(0, 1))
            h = h / h.norm().clamp(min=1e-8)
            return h.unsqueeze(0).repeat(num_layers, 1)
    else:
        model = _load_base(base, opts)
        average = cfg.gate_mode == "hidden_avg"

        def encode(prompts: list[str]) -> torch.Tensor:
            tok = _tokenize(tokenizer, prompts).to(opts.device)
            with torch.no_grad():
                out = model(**tok, output_hidden_states=True, return_dict=True)
            states = torch.stack(out.hidden_states[:-1]).float()  # (layers, batch, seq, hidden)
            if average:
                mask = tok["attention_mask"].float()[None, :, :, None]
                per_prompt = (states * mask).sum(dim=2) / mask.sum(dim=2).clamp(min=1)
            else:
                per_prompt = states[:, :, -1, :]  # prompts are left-padded: the last token is real
            return per_prompt.mean(dim=1).cpu()

    rows = []
    for e in experts:
        h = encode(e.positive_prompts)
        if e.negative_prompts:
            h = h - encode(e.negative_prompts)
        rows.append(h / h.norm(dim=-1, keepdim=True).clamp(min=1e-8))
    vecs = torch.stack(rows, dim=1)
    if vecs.shape[0] != num_layers:
        raise UserError(f"model {base.ref}: got hidden states for {vecs.shape[0]} layers, expected {num_layers}")
    return vecs


def _tokenizer(base: _Model, opts: MoEOptions):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(base.path, trust_remote_code=opts.trust_remote_code)
    except Exception as e:
        raise UserError(f"model {base.ref}: cannot load its tokenizer for prompt-based gates "
                        f"({type(e).__name__}); use gate_mode: random")
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.bos_token or tok.eos_token
    return tok


def _tokenize(tokenizer, prompts: list[str]):
    return tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
                     add_special_tokens=False)


def _load_base(base: _Model, opts: MoEOptions):
    import transformers
    from transformers import AutoModelForCausalLM

    prev = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    if opts.quiet:
        transformers.utils.logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.bfloat16,
                                                     trust_remote_code=opts.trust_remote_code)
    except Exception as e:
        raise UserError(f"model {base.ref}: cannot load it to compute hidden-state gates ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]})")
    finally:
        transformers.logging.set_verbosity(prev)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return model.to(opts.device).eval()


def degenerate_layers(vecs: torch.Tensor, threshold: float = 5.0) -> list[int]:
    out = []
    for i in range(vecs.shape[0]):
        s = torch.linalg.svdvals(vecs[i].float())
        if s[-1] <= 0 or float(s[0] / s[-1]) > threshold:
            out.append(i)
    return out


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def out_config(arch: str, base_cfg: dict, cfg: MoEConfig, intermediate: int, dtype: str) -> dict:
    import transformers

    d = {k: v for k, v in unquantized_config(base_cfg).items()  # experts are written unquantized
         if k not in ("model_type", "architectures", "transformers_version", "attention_bias", "mlp_bias",
                      "pretraining_tp", "_name_or_path", "auto_map", "torch_dtype", "dtype", "use_sliding_window",
                      "sliding_window", "max_window_layers", "layer_types")}
    n = len(cfg.experts)
    if arch == "mixtral":
        out = transformers.MixtralConfig(**d, num_local_experts=n, num_experts_per_tok=cfg.experts_per_token,
                                         sliding_window=None)
        out.architectures = ["MixtralForCausalLM"]
    else:
        out = transformers.Qwen2MoeConfig(**d, num_experts=n, num_experts_per_tok=cfg.experts_per_token,
                                          decoder_sparse_step=1, norm_topk_prob=True, use_sliding_window=False,
                                          moe_intermediate_size=intermediate,
                                          shared_expert_intermediate_size=intermediate, mlp_only_layers=[],
                                          qkv_bias=True)
        out.architectures = ["Qwen2MoeForCausalLM"]
    result = out.to_diff_dict()
    result["architectures"] = out.architectures
    result["model_type"] = out.model_type
    result["dtype"] = dtype
    result["torch_dtype"] = dtype
    return result


def build_moe(cfg: MoEConfig, out_dir: str, opts: MoEOptions) -> MoEResult:

    start = time.time()
    cache: dict = {}
    base = _open(cfg.base_model, cache)
    experts = [_open(e.source_model, cache) for e in cfg.experts]
    shared = [_open(e.source_model, cache) for e in cfg.shared_experts]
    arch = select_architecture(cfg, [m.config.get("model_type", "?") for m in [base] + experts + shared])
    if not opts.allow_all_same and len(cfg.experts) > 1 and \
            all(e.source_model == cfg.experts[0].source_model for e in cfg.experts[1:]):
        raise UserError("every expert is the same model, so the MoE would only be slower than it; pass "
                        "--i-understand-this-is-not-useful-without-training to build it anyway (for training)",
                        source=cfg.source, key="experts")

    layout = infer_layout(list(base.reader.index), base.config, str(base.ref))
    num_layers = layout.num_layers
    hidden = _cfg(base.config, "hidden_size")
    intermediate = _cfg(base.config, "intermediate_size")
    if arch == "mixtral" and base.config.get("model_type") == "llama" and \
            (base.config.get("attention_bias") or base.config.get("mlp_bias")):
        raise UserError(f"model {base.ref}: Llama models with attention or MLP biases cannot become Mixtral")
    mlp_suffixes = [f"mlp.{p}.weight" for p in MLP_PROJ]
    other_mlp = [s for s in layout.layer_suffixes if s.startswith("mlp.") and s not in mlp_suffixes]
    if other_mlp or not all(s in layout.layer_suffixes for s in mlp_suffixes):
        raise UserError(f"model {base.ref}: expected MLP weights mlp.gate_proj/up_proj/down_proj only in each "
                        f"layer (found {', '.join(s for s in layout.layer_suffixes if s.startswith('mlp.'))})")
    for e, m in zip(cfg.experts + cfg.shared_experts, experts + shared):
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers"):
            if _cfg(m.config, key) != _cfg(base.config, key):
                raise UserError(f"expert {e.source_model}: {key} is {_cfg(m.config, key)}, the base model has "
                                f"{_cfg(base.config, key)}")
        for i in range(num_layers):
            for s in mlp_suffixes:
                name = layout.layer_name(i, s)
                if name not in m.reader.index:
                    raise UserError(f"expert {e.source_model}: missing tensor {name}")

    dtype = cfg.dtype or _model_dtype(base)
    vecs = gate_vectors(cfg, base, layout, num_layers, hidden, opts)
    degenerate = degenerate_layers(vecs[:, : len(cfg.experts)]) if len(cfg.experts) > 1 else []
    if degenerate and cfg.gate_mode not in ("random", "uniform_random"):
        which = "all layers" if len(degenerate) == num_layers else f"layers {', '.join(map(str, degenerate))}"
        note(f"{which} have nearly degenerate routing (prompts too similar); some experts will be underused",
             opts.quiet)
    config = out_config(arch, base.config, cfg, intermediate, dtype)
    seed = opts.random_seed

    def copy(m: _Model, src: str, expert: Optional[Expert] = None, residual: bool = False, out_name: str = ""):
        def make():
            t = m.reader.read(src)
            if expert is not None and expert.noise_scale:
                g = torch.Generator().manual_seed(tensor_seed(seed, out_name))
                t = t.float() + torch.randn(t.shape, generator=g) * expert.noise_scale
            if expert is not None and residual and expert.residual_scale is not None:
                t = t.float() * expert.residual_scale
            return t
        return make

    tensors: list[OutTensor] = []

    def add(out_name: str, m: _Model, src: str, expert: Optional[Expert] = None, residual: bool = False):
        tensors.append(OutTensor(out_name, tuple(m.reader.index[src].shape), dtype,
                                 copy(m, src, expert, residual, out_name)))

    for name in layout.pre:
        add(name, base, name)
    for i in range(num_layers):
        for s in layout.layer_suffixes:
            if s in mlp_suffixes:
                continue
            add(layout.layer_name(i, s), base, layout.layer_name(i, s))
        if arch == "qwen2_moe":
            for proj in ("q_proj", "k_proj", "v_proj"):  # Qwen2-MoE attention has biases: zeros if absent
                bias = layout.layer_name(i, f"self_attn.{proj}.bias")
                weight = layout.layer_name(i, f"self_attn.{proj}.weight")
                if bias not in base.reader.index and weight in base.reader.index:
                    rows = base.reader.index[weight].shape[0]
                    tensors.append(OutTensor(bias, (rows,), dtype, lambda rows=rows: torch.zeros(rows)))
        mlp = layout.layer_name(i, "block_sparse_moe" if arch == "mixtral" else "mlp")
        gate = vecs[i, : len(cfg.experts)].clone()
        tensors.append(OutTensor(f"{mlp}.gate.weight", tuple(gate.shape), dtype, lambda t=gate: t))
        for e_idx, (e, m) in enumerate(zip(cfg.experts, experts)):
            for proj in MLP_PROJ:
                src = layout.layer_name(i, f"mlp.{proj}.weight")
                part = MIXTRAL_NAMES[proj] if arch == "mixtral" else proj
                add(f"{mlp}.experts.{e_idx}.{part}.weight", m, src, e, proj == "down_proj")
        if arch == "qwen2_moe":
            e, m = cfg.shared_experts[0], shared[0]
            for proj in MLP_PROJ:
                src = layout.layer_name(i, f"mlp.{proj}.weight")
                add(f"{mlp}.shared_expert.{proj}.weight", m, src, e, proj == "down_proj")
            row = vecs[i, len(cfg.experts):].clone()  # (1, hidden)
            tensors.append(OutTensor(f"{mlp}.shared_expert_gate.weight", tuple(row.shape), dtype, lambda t=row: t))
    for name in layout.post:
        add(name, base, name)

    from tqdm.auto import tqdm

    stage = begin_output(out_dir)
    try:
        with tqdm(total=sum(t.nbytes for t in tensors), unit="B", unit_scale=True, desc="writing",
                  disable=opts.quiet) as bar:
            write_sharded(stage, tensors, opts.out_shard_bytes, on_tensor=lambda t: bar.update(t.nbytes))
        write_json(os.path.join(stage, "config.json"), config)
        copy_model_extras(base.path, stage, tokenizer=opts.copy_tokenizer)
        if opts.write_model_card:
            with open(os.path.join(stage, "ray_merge_moe_config.yml"), "w", encoding="utf-8") as f:
                f.write(cfg.text or _dump(cfg))
            with open(os.path.join(stage, "README.md"), "w", encoding="utf-8") as f:
                f.write(_card(cfg, arch))
        write_json(os.path.join(stage, "ray_merge_manifest.json"), {
            "tool": "moe",
            "architecture": arch,
            "gate_mode": cfg.gate_mode,
            "random_seed": opts.random_seed,
            "inputs": [{"ref": str(m.ref), "path": m.path} for m in cache.values()],
            "versions": package_versions(),
        })
        finish_output(stage, out_dir)
    except BaseException:
        abort_output(stage)
        raise
    return MoEResult(out=os.path.abspath(out_dir), architecture="Mixtral" if arch == "mixtral" else "Qwen2-MoE",
                     num_experts=len(cfg.experts), experts_per_token=cfg.experts_per_token,
                     num_tensors=len(tensors), config=config, seconds=time.time() - start)


def _model_dtype(m: _Model) -> str:
    for key in ("dtype", "torch_dtype"):
        v = m.config.get(key)
        if isinstance(v, str) and DTYPE_ALIASES.get(v, v) in DTYPES:
            return DTYPE_ALIASES.get(v, v)
    for meta in m.reader.index.values():
        if meta.dtype.is_floating_point:
            return str(meta.dtype).removeprefix("torch.")
    return "float32"


def _dump(cfg: MoEConfig) -> str:
    def e(x: Expert) -> dict:
        d = {"source_model": str(x.source_model)}
        if x.positive_prompts:
            d["positive_prompts"] = x.positive_prompts
        if x.negative_prompts:
            d["negative_prompts"] = x.negative_prompts
        return d

    data = {"base_model": str(cfg.base_model), "gate_mode": cfg.gate_mode, "dtype": cfg.dtype,
            "experts_per_token": cfg.experts_per_token, "experts": [e(x) for x in cfg.experts]}
    if cfg.shared_experts:
        data["shared_experts"] = [e(x) for x in cfg.shared_experts]
    return yaml.safe_dump(data, sort_keys=False)


def _card(cfg: MoEConfig, arch: str) -> str:
    front = {"base_model": list(dict.fromkeys([str(cfg.base_model)] + [str(e.source_model) for e in
                                                                          cfg.experts + cfg.shared_experts])),
             "library_name": "transformers", "tags": ["moe", "merge", "ray-merge"]}
    name = "Mixtral" if arch == "mixtral" else "Qwen2-MoE"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---",
             f"# {name} mixture of experts", "",
             f"Assembled with `ray-merge moe`: attention, norms and embeddings from `{cfg.base_model}`, "
             f"{len(cfg.experts)} expert(s) ({cfg.experts_per_token} per token), gates from `{cfg.gate_mode}`.", "",
             "Experts:"]
    lines += [f"- {e.source_model}" for e in cfg.experts]
    if cfg.shared_experts:
        lines += ["", "Shared expert:", f"- {cfg.shared_experts[0].source_model}"]
    lines += ["", "## Configuration", "", "```yaml", (cfg.text or _dump(cfg)).rstrip(), "```", ""]
    return "\n".join(lines)
