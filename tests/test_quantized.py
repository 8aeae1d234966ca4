"""Quantized checkpoints: block-scaled FP8 and MXFP4 inputs are dequantized on read and merged like float ones;
the output is written unquantized; every other quantized format is refused in one line (exit 2).

The quantized models are made here from float ones: FP8 by scaling each block to the float8 range, MXFP4 from
experts whose values are exactly representable (so its dequantization is exact).
"""
from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from conftest import load_dir, run_cli, write_recipe
from models import build_model, save_model
from safetensors.torch import save_file

from ray_merge.errors import UserError
from ray_merge.io.models import TensorMeta, WeightReader, index_weights
from ray_merge.io.quantized import dequantize_fp8, dequantize_mxfp4, dequantized_index, quantization_format
from ray_merge.planner.plan import plan_recipe
from ray_merge.recipe.load import recipe_from_dict

FP8_BLOCK = (32, 32)  # hidden 64, intermediate 176: some blocks are partial
LINEAR = """
merge_method: linear
models:
  - model: A
    parameters: {weight: 0.3}
  - model: B
    parameters: {weight: 0.7}
"""


def _write_model(out_dir: str, src_dir: str, shards: list[dict], config_update: dict) -> str:
    """A copy of ``src_dir`` (config, tokenizer) with the given weight shards and config.json updated."""
    shutil.copytree(src_dir, out_dir)
    for f in os.listdir(out_dir):
        if f.endswith((".safetensors", ".safetensors.index.json")):
            os.remove(os.path.join(out_dir, f))
    weight_map = {}
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, name),
                  metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(out_dir, "config.json")) as f:
        config = json.load(f)
    config.update(config_update)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f)
    return out_dir


# -- block-scaled FP8 -------------------------------------------------------------------------------------


def fp8_quantize(w: torch.Tensor, block: tuple[int, int]):
    """(float8 weight, float32 scale_inv per block, the float32 value they stand for), block by block."""
    bm, bn = block
    rows, cols = w.shape
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    scale_inv = torch.empty(math.ceil(rows / bm), math.ceil(cols / bn), dtype=torch.float32)
    value = torch.empty(w.shape, dtype=torch.float32)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            part = (slice(i * bm, (i + 1) * bm), slice(j * bn, (j + 1) * bn))
            s = w[part].abs().max().clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
            q[part] = (w[part] / s).to(torch.float8_e4m3fn)
            scale_inv[i, j] = s
            value[part] = q[part].to(torch.float32) * s
    return q, scale_inv, value


@pytest.fixture(scope="module")
def fp8_models(tmp_path_factory):
    """Two Llamas, each as an FP8 checkpoint (weights and scales in separate shards) and as the float32
    checkpoint of its dequantized values."""
    root = tmp_path_factory.mktemp("fp8")
    out = {}
    for i, tag in enumerate("AB"):
        src = save_model(build_model("llama", hidden=64, layers=2, intermediate=176, dtype=torch.float32, seed=i),
                         str(root / f"src{tag}"))
        tensors = load_dir(src)
        weights, scales, values = {}, {}, {}
        for name, t in tensors.items():
            if name.endswith("_proj.weight"):
                weights[name], scales[name + "_scale_inv"], values[name] = fp8_quantize(t, FP8_BLOCK)
            else:
                weights[name] = values[name] = t
        qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
              "weight_block_size": list(FP8_BLOCK), "modules_to_not_convert": ["lm_head", "model.embed_tokens"]}
        out[f"q{tag}"] = _write_model(str(root / f"fp8{tag}"), src, [weights, scales], {"quantization_config": qc})
        out[f"f{tag}"] = _write_model(str(root / f"float{tag}"), src, [values], {})
        out[f"values{tag}"] = values
    return out


def test_fp8_index_presents_dequantized_tensors(fp8_models):
    index = index_weights(fp8_models["qA"], "qA")
    assert not [n for n in index if n.endswith("_scale_inv")]
    assert set(index) == set(index_weights(fp8_models["fA"], "fA"))
    name = "model.layers.0.mlp.down_proj.weight"
    assert index[name].shape == (64, 176) and index[name].dtype == torch.float32
    assert index[name].nbytes == 64 * 176 * 4  # working-set estimates count the dequantized size


def test_fp8_read_whole_and_rows(fp8_models):
    reader = WeightReader(index_weights(fp8_models["qA"], "qA"))
    values = fp8_models["valuesA"]
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.gate_proj.weight",
                 "model.embed_tokens.weight"):
        assert torch.equal(reader.read(name), values[name])
        for start, stop in ((0, 1), (5, 40), (31, 33), (40, 64), (150, 400)):
            assert torch.equal(reader.read_rows(name, start, stop), values[name][start:stop]), (name, start, stop)


def test_fp8_linear_merge_equals_merge_of_dequantized(fp8_models, tmp_path):
    out_q, out_f = tmp_path / "merged_q", tmp_path / "merged_f"
    for out, a, b in ((out_q, "qA", "qB"), (out_f, "fA", "fB")):
        recipe = write_recipe(tmp_path / f"{out.name}.yml", LINEAR, A=fp8_models[a], B=fp8_models[b])
        res = run_cli("run", recipe, out, "--quiet")
        assert res.returncode == 0, res.stderr
    merged, reference = load_dir(out_q), load_dir(out_f)
    assert set(merged) == set(reference) == set(fp8_models["valuesA"])
    for name, t in merged.items():
        assert t.dtype == torch.float32 and torch.equal(t, reference[name]), name
        expected = 0.3 * fp8_models["valuesA"][name] + 0.7 * fp8_models["valuesB"][name]
        torch.testing.assert_close(t, expected, rtol=1e-6, atol=1e-7)
    with open(out_q / "config.json") as f:
        assert "quantization_config" not in json.load(f)

    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out_q, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, merged["model.layers.0.mlp.down_proj.weight"])


def test_fp8_plan_counts_dequantized_bytes(fp8_models):
    recipe = recipe_from_dict({"merge_method": "linear", "models": [
        {"model": fp8_models["qA"], "parameters": {"weight": 1.0}},
        {"model": fp8_models["qB"], "parameters": {"weight": 1.0}}]})
    plan = plan_recipe(recipe)
    pt = plan.tensor("model.layers.0.mlp.down_proj.weight")
    assert pt.in_bytes == 2 * 64 * 176 * 4 and pt.compute_dtype == "float32"
    assert "quantization_config" not in plan.out_config


def test_fp8_dequantization_matches_transformers():
    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    if not hasattr(fp8, "_dequantize_fp8_weight"):
        pytest.skip("this transformers has no FP8 dequantization helper")
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(3, 70, 100, generator=g) * 100).to(torch.float8_e4m3fn)
    scale = torch.rand(3, 3, 4, generator=g)
    ours = dequantize_fp8(weight, scale, (32, 32), torch.float32)
    theirs = fp8._dequantize_fp8_weight(weight, scale, [32, 32], torch.float32)
    assert torch.equal(ours, theirs)


def test_fp8_power_of_two_and_per_tensor_scales():
    g = torch.Generator().manual_seed(1)
    weight = (torch.randn(40, 50, generator=g) * 100).to(torch.float8_e4m3fn)
    scale = torch.exp2(torch.randint(-8, 3, (2, 2), generator=g).float())
    want = dequantize_fp8(weight, scale, (32, 32), torch.float32)
    assert torch.equal(dequantize_fp8(weight, scale.to(torch.float8_e8m0fnu), (32, 32), torch.float32), want)
    assert torch.equal(dequantize_fp8(weight, torch.tensor([0.25]), None, torch.bfloat16),
                       (weight.float() * 0.25).to(torch.bfloat16))


# -- MXFP4 (gpt-oss experts) ------------------------------------------------------------------------------

FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def mxfp4_expert(experts: int, rows: int, cols: int, g: torch.Generator):
    """A random expert tensor of exactly representable values, as transformers holds it ((E, cols, rows)),
    and its MXFP4 blocks (E, rows, cols / 32, 16) and scales (E, rows, cols / 32)."""
    groups = cols // 32
    codes = torch.randint(0, 16, (experts, rows, groups, 32), generator=g)
    exponents = torch.randint(120, 131, (experts, rows, groups), generator=g)
    values = FP4_VALUES[codes] * torch.exp2(exponents.float() - 127).unsqueeze(-1)
    tensor = values.reshape(experts, rows, cols).transpose(1, 2).to(torch.bfloat16)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return tensor, blocks, exponents.to(torch.uint8)


def _gpt_oss(seed: int):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GptOssConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=16, vocab_size=256, num_local_experts=4,
                                    num_experts_per_tok=2, max_position_embeddings=256)
    return transformers.GptOssForCausalLM(cfg).to(torch.bfloat16)


@pytest.fixture(scope="module")
def mxfp4_models(tmp_path_factory):
    """Two tiny gpt-oss models, each as an MXFP4 checkpoint and as the bfloat16 checkpoint of its values."""
    root = tmp_path_factory.mktemp("mxfp4")
    out = {}
    for i, tag in enumerate("AB"):
        model = _gpt_oss(i)
        g = torch.Generator().manual_seed(10 + i)
        packed = {}
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                    experts, cols, rows = p.shape
                    tensor, packed[name + "_blocks"], packed[name + "_scales"] = mxfp4_expert(experts, rows, cols, g)
                    p.copy_(tensor)
        src = save_model(model, str(root / f"float{tag}"))
        tensors = load_dir(src)
        quantized = {k: v for k, v in tensors.items() if k + "_blocks" not in packed}
        quantized.update(packed)
        qc = {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
        out[f"q{tag}"] = _write_model(str(root / f"mxfp4{tag}"), src, [quantized], {"quantization_config": qc})
        out[f"f{tag}"] = src
        out[f"values{tag}"] = tensors
    return out


def test_mxfp4_index_and_reads(mxfp4_models):
    index = index_weights(mxfp4_models["qA"], "qA")
    assert not [n for n in index if n.endswith(("_blocks", "_scales"))]
    assert set(index) == set(mxfp4_models["valuesA"])
    reader = WeightReader(index)
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        want = mxfp4_models["valuesA"][name]
        assert index[name].shape == tuple(want.shape) and index[name].dtype == torch.bfloat16
        assert torch.equal(reader.read(name), want)
        assert torch.equal(reader.read_rows(name, 1, 3), want[1:3])


def test_mxfp4_linear_merge_equals_merge_of_dequantized(mxfp4_models, tmp_path):
    out_q, out_f = tmp_path / "merged_q", tmp_path / "merged_f"
    for out, a, b in ((out_q, "qA", "qB"), (out_f, "fA", "fB")):
        recipe = write_recipe(tmp_path / f"{out.name}.yml", LINEAR, A=mxfp4_models[a], B=mxfp4_models[b])
        res = run_cli("run", recipe, out, "--quiet")
        assert res.returncode == 0, res.stderr
    merged, reference = load_dir(out_q), load_dir(out_f)
    assert set(merged) == set(reference) == set(mxfp4_models["valuesA"])
    for name, t in merged.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, reference[name]), name
    name = "model.layers.0.mlp.experts.gate_up_proj"
    expected = 0.3 * mxfp4_models["valuesA"][name].float() + 0.7 * mxfp4_models["valuesB"][name].float()
    torch.testing.assert_close(merged[name].float(), expected, rtol=1e-2, atol=1e-3)
    with open(out_q / "config.json") as f:
        assert "quantization_config" not in json.load(f)

    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(out_q, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_mxfp4_dequantization_matches_transformers():
    mx = pytest.importorskip("transformers.integrations.mxfp4")
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (2, 6, 3, 16), generator=g).to(torch.uint8)
    scales = torch.randint(100, 150, (2, 6, 3), generator=g).to(torch.uint8)
    theirs = mx.convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.bfloat16), theirs)


# -- other formats: refused ---------------------------------------------------------------------------------


@pytest.mark.parametrize("qc, named", [
    ({"quant_method": "gptq", "bits": 4}, "GPTQ"),
    ({"quant_method": "awq", "bits": 4}, "AWQ"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes 4-bit"),
    ({"load_in_8bit": True}, "bitsandbytes 8-bit"),
    ({"quant_method": "compressed-tensors"}, "compressed-tensors"),
    ({"quant_method": "hqq"}, "HQQ"),
    ({"quant_method": "something_new"}, "something_new"),
])
def test_other_quantization_configs_are_refused(qc, named):
    with pytest.raises(UserError, match=f"model m: {named} quantized weights .* not supported"):
        quantization_format({"quantization_config": qc}, "m")
    assert quantization_format({}, "m") is None
    assert quantization_format({"quantization_config": {"quant_method": "fp8"}}, "m") == "fp8"


@pytest.mark.parametrize("suffix, named", [(".qweight", "GPTQ or AWQ"), (".SCB", "bitsandbytes 8-bit"),
                                           (".absmax", "bitsandbytes 4-bit"), (".weight_packed", "compressed-tensors")])
def test_quantized_tensor_names_are_refused(suffix, named):
    index = {"model.layers.0.self_attn.q_proj" + suffix: TensorMeta("f", (4, 4), torch.int32, 0)}
    with pytest.raises(UserError, match=f"{named} quantized weight"):
        dequantized_index(index, {}, "m")


def test_fp8_weight_without_scales_is_refused():
    index = {"w.weight": TensorMeta("f", (4, 4), torch.float8_e4m3fn, 0)}
    with pytest.raises(UserError, match="float8 but has no w.weight_scale_inv"):
        dequantized_index(index, {"quantization_config": {"quant_method": "fp8"}}, "m")


def test_unsupported_format_exits_2_in_one_line(fp8_models, tmp_path):
    gptq = _write_model(str(tmp_path / "gptq"), fp8_models["fA"], [load_dir(fp8_models["fA"])],
                        {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}})
    recipe = write_recipe(tmp_path / "r.yml", LINEAR, A=gptq, B=fp8_models["fB"])
    res = run_cli("run", recipe, tmp_path / "out", "--quiet")
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert "GPTQ" in res.stderr and "not supported" in res.stderr and "gptq" in res.stderr
    assert not os.path.exists(tmp_path / "out")
