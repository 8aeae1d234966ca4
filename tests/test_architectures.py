"""Many decoder architectures from transformers' causal-LM mapping, built as tiny random models.

Each model type gets a tiny config (4 layers, hidden 32) with its per-layer fields made uneven on
purpose (attention types alternating, the first layer dense and the rest MoE, MoE every other layer,
...), so that a frankenmerge which copies layer fields naively is caught. For each type:

- linear of two models equals (a+b)/2 tensor by tensor, with the same tensor names;
- ties and slerp run and the result loads;
- a frankenmerge (layers [0,3) of one model then [1,4) of the other) has its per-layer config fields
  stacked from the source layers, loads with no missing or unexpected keys, and gives the logits of
  the same stack built independently here (the source models' own layer modules, transplanted).

The pass table is printed at the end of the run (``pytest -s`` or the terminal summary).
"""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import load_dir

from ray_merge.errors import UserError
from ray_merge.options import MergeOptions
from ray_merge.recipe.load import recipe_from_dict

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM

transformers.logging.set_verbosity_error()

L = 4  # layers of every test model
SMALL = dict(
    hidden_size=32, n_embd=32, d_model=32, num_attention_heads=4, n_head=4, n_heads=4, num_key_value_heads=2,
    head_dim=8, intermediate_size=64, n_inner=64, ffn_hidden_size=64, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, shared_intermediate_size=32, vocab_size=128, num_experts=4,
    num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2, moe_k=2, moe_topk=2,
    n_shared_experts=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    n_group=1, topk_group=1, max_position_embeddings=128, n_positions=128, state_size=8, expand=2, conv_kernel=4,
    time_step_rank=4, mamba_d_state=8, mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=1, mamba_d_conv=4,
    mamba_expand=2, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
    linear_value_head_dim=8, sliding_window=4, hidden_size_per_layer_input=8, vocab_size_per_layer_input=128,
    global_head_dim=8, num_global_key_value_heads=2, n_groups=1, mamba_chunk_size=16, chunk_size=16,
    attention_chunk_size=4, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
LAYER_COUNT = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")

# Per-layer structure made uneven for 4 layers (what each type's config has for it).
UNEVEN = {
    "deepseek_v2": dict(first_k_dense_replace=1, num_key_value_heads=4),
    "deepseek_v3": dict(first_k_dense_replace=1, num_key_value_heads=4),
    "glm4_moe": dict(first_k_dense_replace=1),
    "dots1": dict(first_k_dense_replace=1),
    "ernie4_5_moe": dict(moe_layer_start_index=1, moe_layer_end_index=3, moe_layer_interval=1),
    "llama4_text": dict(moe_layers=[1, 3], no_rope_layers=[1, 0, 1, 1],
                        layer_types=["chunked_attention", "full_attention", "chunked_attention",
                                     "chunked_attention"]),
    "smollm3": dict(no_rope_layers=[1, 0, 1, 1]),
    "qwen2_moe": dict(mlp_only_layers=[0]),
    "qwen3_moe": dict(mlp_only_layers=[0]),
    "qwen3_next": dict(mlp_only_layers=[0]),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    "bamba": dict(attn_layer_indices=[1]),
    "granitemoehybrid": dict(layer_types=["linear_attention", "attention", "linear_attention", "linear_attention"]),
    "lfm2": dict(full_attn_idxs=[1], layer_types=None),
    "afmoe": dict(num_dense_layers=1),
    "mamba2": dict(num_heads=8, head_dim=8),
    "falcon_h1": dict(mamba_d_ssm=64),
    "gemma4_text": dict(layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"]),
    # KV sharing counts layers from the end (a scalar no stack keeps): none here; two AltUp streams
    "gemma3n_text": dict(num_kv_shared_layers=0, activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0], laurel_rank=4,
                         altup_num_inputs=2),
}

TYPES = [
    # dense
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "cohere", "cohere2", "phi", "phi3",
    "stablelm", "starcoder2", "olmo", "olmo2", "olmo3", "gpt2", "gpt_neox", "falcon", "exaone4", "smollm3",
    "granite", "helium", "glm", "glm4", "nemotron", "persimmon", "bloom", "gpt_bigcode", "mpt", "ernie4_5",
    "seed_oss", "arcee", "apertus", "ministral", "vaultgemma", "diffllama", "hunyuan_v1_dense",
    # MoE
    "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3", "glm4_moe", "ernie4_5_moe", "llama4_text",
    "granitemoe", "olmoe", "phimoe", "dots1", "gpt_oss", "afmoe", "cohere2_moe", "hunyuan_v1_moe",
    # hybrid / linear attention / SSM
    "qwen3_next", "qwen3_5_text", "minimax", "lfm2", "jamba", "bamba", "granitemoehybrid", "falcon_h1",
    "mamba", "mamba2", "falcon_mamba",
    # multimodal families' text decoders
    "gemma4_text", "gemma3n_text", "qwen3_5_moe_text",
]

RESULTS: dict[str, dict[str, str]] = {}


def _note(model_type: str, check: str, result: str) -> None:
    RESULTS.setdefault(model_type, {})[check] = result


def tiny_config(model_type: str):
    """A tiny config of ``model_type``, its per-layer fields made uneven (built through the config class,
    so that fields derived from the layer count are derived for 4 layers)."""
    default = AutoConfig.for_model(model_type)
    known = set(default.to_dict()) | {k for k in dir(type(default)) if not k.startswith("_")}
    known -= {k for k in dir(type(default)) if isinstance(getattr(type(default), k, None), property)}
    kwargs = {k: v for k, v in SMALL.items() if k in known}
    kwargs.update({k: L for k in LAYER_COUNT if k in known})
    for key in ("layer_types", "mlp_layer_types"):  # regenerated for 4 layers, then made uneven
        values = default.to_dict().get(key)
        if isinstance(values, list) and values:
            kinds = list(dict.fromkeys(values))
            kwargs[key] = [kinds[0], kinds[-1], kinds[0], kinds[0]] if key == "layer_types" else \
                [kinds[0]] + [kinds[-1]] * (L - 1)
    kwargs.update(UNEVEN.get(model_type, {}))
    if model_type == "gemma4_text":
        kwargs.pop("per_layer_config", None)
    return AutoConfig.for_model(model_type, **kwargs)


_BUILT: dict[str, object] = {}


def build_pair(model_type: str, root):
    """Two tiny random models of one type (different seeds), saved as safetensors; memoized per session."""
    if model_type in _BUILT:
        return _BUILT[model_type]
    try:
        cfg = tiny_config(model_type)
        paths = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
            with torch.no_grad():  # random norms and biases too, so that every tensor differs
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.02)
            path = root / f"{model_type}_{seed}"
            model.save_pretrained(path, safe_serialization=True)
            paths.append(path)
        result = tuple(paths)
    except ImportError as e:  # a type that needs a package we do not have
        result = f"skip: {e}"
    _BUILT[model_type] = result
    return result


@pytest.fixture(scope="module")
def arch_root(tmp_path_factory):
    return tmp_path_factory.mktemp("arch")


def _pair(model_type, arch_root):
    pair = build_pair(model_type, arch_root)
    if isinstance(pair, str):
        _note(model_type, "build", pair)
        pytest.skip(f"{model_type}: {pair}")
    return pair


def _merge(recipe: dict, out, **options) -> None:
    from ray_merge.engine import run_merge

    run_merge(recipe_from_dict(recipe), str(out), MergeOptions(quiet=True, **options))


def _load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not bad, f"{path}: {bad}"
    return model.eval()


IDS = torch.tensor([[5, 17, 3, 99, 42, 7, 64, 1, 88, 23, 11, 70]])  # longer than the sliding windows


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS, use_cache=False).logits


@pytest.mark.parametrize("model_type", TYPES)
def test_linear_is_mean(model_type, arch_root, tmp_path):
    a, b = _pair(model_type, arch_root)
    try:
        _merge({"merge_method": "linear", "dtype": "float32",
                "models": [{"model": str(a), "parameters": {"weight": 1.0}},
                           {"model": str(b), "parameters": {"weight": 1.0}}]}, tmp_path / "out")
        got, ta, tb = load_dir(tmp_path / "out"), load_dir(a), load_dir(b)
        assert set(got) == set(ta)
        for k in ta:
            want = (ta[k].float() + tb[k].float()) / 2 if ta[k].is_floating_point() else ta[k]
            torch.testing.assert_close(got[k], want.to(got[k].dtype), rtol=1e-6, atol=1e-7, msg=k)
        _load(tmp_path / "out")
    except BaseException:
        _note(model_type, "linear", "FAIL")
        raise
    _note(model_type, "linear", "ok")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ties", "slerp"])
@pytest.mark.parametrize("model_type", TYPES)
def test_ties_and_slerp_load(model_type, method, arch_root, tmp_path):
    a, b = _pair(model_type, arch_root)
    if method == "ties":
        recipe = {"merge_method": "ties", "base_model": str(a), "dtype": "float32",
                  "parameters": {"density": 0.5, "weight": 1.0},
                  "models": [{"model": str(a)}, {"model": str(b)}]}
    else:
        recipe = {"merge_method": "slerp", "base_model": str(a), "dtype": "float32", "parameters": {"t": 0.3},
                  "models": [{"model": str(a)}, {"model": str(b)}]}
    try:
        _merge(recipe, tmp_path / "out")
        assert set(load_dir(tmp_path / "out")) == set(load_dir(a))
        assert torch.isfinite(_logits(_load(tmp_path / "out"))).all()
    except BaseException:
        _note(model_type, method, "FAIL")
        raise
    _note(model_type, method, "ok")


def _stacked_reference(a_path, b_path):
    """Layers [0,3) of a then [1,4) of b, built from the models' own modules: embeddings from a (the first
    slice), everything after the layers from b (the last slice), as mergekit does."""
    ma = AutoModelForCausalLM.from_pretrained(a_path, dtype=torch.float32).eval()
    mb = AutoModelForCausalLM.from_pretrained(b_path, dtype=torch.float32).eval()
    ref = copy.deepcopy(ma)
    holder, attr = _layer_list(ref)
    prefix = _layer_prefix(ref)
    layers_a, layers_b = getattr(_layer_list(ma)[0], attr), getattr(_layer_list(mb)[0], attr)
    setattr(holder, attr, torch.nn.ModuleList([layers_a[i] for i in range(3)] + [layers_b[i] for i in range(1, 4)]))
    # the config of the skeleton: layer count and per-layer lists for 6 layers
    for cfg, ca, cb in _configs(ref.config, ma.config, mb.config):
        for key, value in list(vars(cfg).items()):
            if key in LAYER_COUNT and value == L:
                setattr(cfg, key, 6)
            elif isinstance(value, list) and len(value) == L and key not in ("architectures",):
                setattr(cfg, key, getattr(ca, key)[0:3] + getattr(cb, key)[1:4])
    # after the layers: b's tensors (final norm, lm_head unless tied to the embeddings)
    sb = mb.state_dict()
    with torch.no_grad():
        for name, t in ref.state_dict().items():
            if name.startswith(prefix) or any(h in name for h in ("embed", "wte", "wpe", "word_embeddings")):
                continue
            if name in sb and not (name.endswith("lm_head.weight") and ref.config.get_text_config().tie_word_embeddings):
                t.copy_(sb[name])
    width = getattr(ref.config.get_text_config(), "hidden_size_per_layer_input", None)
    if width:
        _restack_packed(ref, ma, mb, width, prefix)
    return ref


def _restack_packed(ref, ma, mb, width: int, prefix: str) -> None:
    """Gemma 3n / 4's per-layer input embedding and projection outside the layers hold one block per layer
    (the embedding's columns, the projection's output rows): the blocks of layers [0,3) of a then [1,4) of b."""
    mods_a, mods_b = dict(ma.named_modules()), dict(mb.named_modules())
    found = 0
    for name, mod in ref.named_modules():
        if "per_layer" not in name or f"{name}.".startswith(prefix):
            continue
        if isinstance(mod, torch.nn.Embedding):
            dim = 1
        elif isinstance(mod, torch.nn.Linear) and mod.out_features == L * width:
            dim = 0
        else:
            continue
        wa, wb = mods_a[name].weight.detach(), mods_b[name].weight.detach()
        blocks = [wa.narrow(dim, i * width, width) for i in range(0, 3)] + \
            [wb.narrow(dim, i * width, width) for i in range(1, 4)]
        mod.weight = torch.nn.Parameter(torch.cat(blocks, dim), requires_grad=False)
        found += 1
    assert found == 2, "expected the per-layer embedding and projection"


def _renumbered_reference(a_path, b_path, config_path):
    """The stack from the output's config and the source layers' weights, renumbered here."""
    ma = AutoModelForCausalLM.from_pretrained(a_path, dtype=torch.float32)
    mb = AutoModelForCausalLM.from_pretrained(b_path, dtype=torch.float32)
    cfg = AutoConfig.from_pretrained(config_path.parent)
    ref = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    prefix = _layer_prefix(ma)
    sa, sb = ma.state_dict(), mb.state_dict()
    state = {}
    for name in ref.state_dict():
        if name.startswith(prefix):
            j, _, rest = name[len(prefix):].partition(".")
            src, i = (sa, int(j)) if int(j) < 3 else (sb, int(j) - 2)
            state[name] = src[f"{prefix}{i}.{rest}"]
        else:
            state[name] = sa[name] if any(h in name for h in ("embed", "wte", "wpe")) else sb[name]
    ref.load_state_dict(state)
    return ref


def _configs(*cfgs):
    yield cfgs
    texts = [c.get_text_config() for c in cfgs]
    if texts[0] is not cfgs[0]:
        yield texts


def _layer_list(model):
    for mod in model.modules():
        for attr in ("layers", "h", "blocks"):
            layers = getattr(mod, attr, None)
            if isinstance(layers, torch.nn.ModuleList) and len(layers) == L:
                return mod, attr
    raise AssertionError("no layer list found")


def _layer_prefix(model) -> str:
    holder, attr = _layer_list(model)
    for name, mod in model.named_modules():
        if mod is holder:
            return f"{name}.{attr}." if name else f"{attr}."
    raise AssertionError("layer list not found by name")


@pytest.mark.parametrize("model_type", TYPES)
def test_frankenmerge_stack(model_type, arch_root, tmp_path):
    a, b = _pair(model_type, arch_root)
    recipe = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(b), "layer_range": [1, 4]}]}]}
    try:
        try:
            _merge(recipe, tmp_path / "out")
        except UserError as e:
            if model_type in CANNOT_STACK:
                assert CANNOT_STACK[model_type] in str(e), str(e)
                _note(model_type, "franken", "refused")
                return
            raise
        assert model_type not in CANNOT_STACK
        cfg_a = json.loads((a / "config.json").read_text())
        cfg_b = json.loads((b / "config.json").read_text())
        out = json.loads((tmp_path / "out" / "config.json").read_text())
        for key, value in cfg_a.items():  # every per-layer list is stacked from the source layers
            if isinstance(value, list) and len(value) == L:
                assert out[key] == value[0:3] + cfg_b[key][1:4], key
        got = _logits(_load(tmp_path / "out"))
        if model_type in BY_POSITION:
            want = _logits(_renumbered_reference(a, b, tmp_path / "out" / "config.json"))
        else:
            want = _logits(_stacked_reference(a, b))
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (got - want).abs().max()
    except BaseException:
        _note(model_type, "franken", "FAIL")
        raise
    _note(model_type, "franken", "ok")


# Types whose frankenmerge ray-merge refuses (with this text in the error), and why.
CANNOT_STACK: dict[str, str] = {}
# Types whose layers compute with their own position (DiffLlama's lambda_init from layer_idx): a stacked
# layer behaves as its new position says, so the reference is the output config with the source layers'
# weights under their new numbers, not the source modules.
BY_POSITION = {"diffllama"}


def _slices(*sources):
    return {"merge_method": "linear", "dtype": "float32", "parameters": {"weight": 1.0},
            "slices": [{"sources": [{"model": str(m), "layer_range": list(r)} for m, r in sources]}]}


def test_layers_of_different_structure_are_refused(arch_root, tmp_path):
    a, b = _pair("deepseek_v2", arch_root)  # layer 0 dense, layers 1-3 MoE
    with pytest.raises(UserError, match=r"layer 0 of .*deepseek_v2_0 and layer 1 of .*deepseek_v2_1 have "
                                        r"different tensors .*mlp\.down_proj\.weight.*mlp\.experts"):
        _merge(_slices((a, (0, 2)), (b, (1, 3))), tmp_path / "out")
    with pytest.raises(UserError, match="different tensors"):  # crimes never merge different tensors
        _merge(_slices((a, (0, 2)), (b, (1, 3))), tmp_path / "out", allow_crimes=True)


def test_layers_of_different_kinds_need_crimes(arch_root, tmp_path):
    a, b = _pair("gemma3_text", arch_root)  # sliding, full, sliding, sliding: the same tensors
    with pytest.raises(UserError, match=r"layer_types: layer 0 of .*: sliding_attention; layer 1 of .*: "
                                        r"full_attention\).*--allow-crimes"):
        _merge(_slices((a, (0, 2)), (b, (1, 3))), tmp_path / "out")
    _merge(_slices((a, (0, 2)), (b, (1, 3))), tmp_path / "out", allow_crimes=True)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["layer_types"] == [
        "sliding_attention", "full_attention"]  # the first source's


def test_stack_no_scalar_describes_is_refused(arch_root, tmp_path):
    a, b = _pair("deepseek_v2", arch_root)  # a MoE layer then a dense one: first_k_dense_replace cannot say it
    recipe = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(a), "layer_range": [1, 2]}]},
                                                        {"sources": [{"model": str(b), "layer_range": [0, 1]}]}]}
    with pytest.raises(UserError, match="cannot be described by config fields first_k_dense_replace"):
        _merge(recipe, tmp_path / "out")


def test_layer_types_derived_from_a_pattern_are_written():
    """A config.json with a sliding-window pattern and no layer_types gets an explicit list for a new stack."""
    from ray_merge.planner.layer_config import layer_values, stack_layer_fields

    cfg = {"model_type": "gemma3_text", "num_hidden_layers": 4, "sliding_window_pattern": 2,
           "mlp_only_layers": [0], "first_k_dense_replace": 1}
    values = layer_values(cfg)
    assert values["layer_types"] == ["sliding_attention", "full_attention"] * 2
    out = stack_layer_fields(cfg, values, [(values, 0), (values, 3), (values, 1)], ["x", "y", "z"])
    assert out["layer_types"] == ["sliding_attention", "full_attention", "full_attention"]
    assert out["mlp_only_layers"] == [0] and out["num_hidden_layers"] == 3 and out["first_k_dense_replace"] == 1
    with pytest.raises(UserError, match="first_k_dense_replace"):  # dense after MoE: no prefix says it
        stack_layer_fields(cfg, values, [(values, 1), (values, 0)], ["x", "y"])


def test_print_pass_table():
    """Runs last in this file: the model_type -> linear / ties / slerp / franken table."""
    _print_table()


def _print_table():
    if not RESULTS:
        return
    checks = ["linear", "ties", "slerp", "franken"]
    lines = [f"{'model_type':<20}" + "".join(f"{c:<9}" for c in checks)]
    for mt in TYPES:
        r = RESULTS.get(mt, {})
        lines.append(f"{mt:<20}" + "".join(f"{r.get(c, r.get('build', '-'))[:8]:<9}" for c in checks))
    print("\n" + "\n".join(lines))
