"""`ray-merge moe`: Mixtral and Qwen2-MoE models assembled from dense models."""
from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from conftest import load_dir

from ray_merge import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = torch.randint(4, 250, (2, 10), generator=torch.Generator().manual_seed(0))


def write(tmp_path, data: dict, name: str = "moe.yml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def run_moe(capsys, config: str, out, *extra) -> tuple[int, str]:
    rc = cli.main(["moe", config, str(out), "--quiet", *map(str, extra)])
    return rc, capsys.readouterr().err


def load(path: str):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def forward(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_mixtral_with_identical_experts_is_the_dense_model(models_dir, tmp_path, capsys, kind):
    base = str(models_dir / f"{kind}_base")
    cfg = write(tmp_path, {"base_model": base, "gate_mode": "random", "experts_per_token": 1,
                           "experts": [{"source_model": base}] * 3})
    rc, err = run_moe(capsys, cfg, tmp_path / "out")
    assert rc == 2 and "same model" in err  # mergekit's guard
    rc, err = run_moe(capsys, cfg, tmp_path / "out", "--i-understand-this-is-not-useful-without-training")
    assert rc == 0, err
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    assert config["num_local_experts"] == 3 and config["num_experts_per_tok"] == 1
    moe = load(str(tmp_path / "out"))
    assert type(moe).__name__ == "MixtralForCausalLM"
    torch.testing.assert_close(forward(moe), forward(load(base)), atol=1e-5, rtol=1e-5)


def test_mixtral_hidden_gates_from_different_experts(models_dir, tmp_path, capsys):
    base, ft0, ft1 = (str(models_dir / f"llama_{n}") for n in ("base", "ft0", "ft1"))
    cfg = write(tmp_path, {
        "base_model": base, "gate_mode": "hidden", "dtype": "bfloat16", "experts_per_token": 2,
        "experts": [
            {"source_model": ft0, "positive_prompts": ["w1 w2 w3", "w4 w5"], "negative_prompts": ["w200"]},
            {"source_model": ft1, "positive_prompts": ["w100 w101 w102"], "residual_scale": 0.5},
        ],
    })
    rc, err = run_moe(capsys, cfg, tmp_path / "out")
    assert rc == 0, err
    out = load_dir(tmp_path / "out")
    src0, src1, b = load_dir(ft0), load_dir(ft1), load_dir(base)
    layer = "model.layers.2"
    assert torch.equal(out[f"{layer}.block_sparse_moe.experts.0.w1.weight"], src0[f"{layer}.mlp.gate_proj.weight"])
    assert torch.equal(out[f"{layer}.block_sparse_moe.experts.0.w2.weight"], src0[f"{layer}.mlp.down_proj.weight"])
    assert torch.equal(out[f"{layer}.block_sparse_moe.experts.1.w3.weight"], src1[f"{layer}.mlp.up_proj.weight"])
    torch.testing.assert_close(out[f"{layer}.block_sparse_moe.experts.1.w2.weight"].float(),
                               src1[f"{layer}.mlp.down_proj.weight"].float() * 0.5)
    assert torch.equal(out[f"{layer}.self_attn.q_proj.weight"], b[f"{layer}.self_attn.q_proj.weight"])
    assert not any(".mlp." in k for k in out)
    gates = [out[f"model.layers.{i}.block_sparse_moe.gate.weight"].float() for i in range(4)]
    for g in gates:
        assert g.shape == (2, 64)
        torch.testing.assert_close(g.norm(dim=-1), torch.ones(2), atol=1e-2, rtol=0)
    assert not torch.allclose(gates[0], gates[3])  # one set of hidden states per layer
    moe = load(str(tmp_path / "out"))
    assert torch.isfinite(forward(moe)).all()
    assert (tmp_path / "out" / "tokenizer.json").exists()
    assert (tmp_path / "out" / "ray_merge_moe_config.yml").exists()


def test_qwen2_moe_with_identical_experts_is_the_dense_model(models_dir, tmp_path, capsys):
    base = str(models_dir / "qwen2_base")
    cfg = write(tmp_path, {
        "base_model": base, "architecture": "qwen", "gate_mode": "cheap_embed", "experts_per_token": 1,
        "experts": [{"source_model": base, "positive_prompts": ["w1 w2"]},
                    {"source_model": base, "positive_prompts": ["w9"]}],
        # a shared expert that adds nothing: the routed expert alone reproduces the dense MLP
        "shared_experts": [{"source_model": base, "positive_prompts": ["w3"], "residual_scale": 0.0}],
    })
    rc, err = run_moe(capsys, cfg, tmp_path / "out", "--i-understand-this-is-not-useful-without-training")
    assert rc == 0, err
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"] and config["num_experts"] == 2
    assert config["tie_word_embeddings"] is True
    moe = load(str(tmp_path / "out"))
    assert type(moe).__name__ == "Qwen2MoeForCausalLM"
    torch.testing.assert_close(forward(moe), forward(load(base)), atol=1e-5, rtol=1e-5)


def test_qwen2_moe_from_llama_gets_zero_attention_biases(models_dir, tmp_path, capsys):
    base, ft0, ft1 = (str(models_dir / f"llama_{n}") for n in ("base", "ft0", "ft1"))
    cfg = write(tmp_path, {
        "base_model": base, "gate_mode": "random", "experts_per_token": 2,
        "experts": [{"source_model": ft0}, {"source_model": ft1}, {"source_model": base}],
        "shared_experts": [{"source_model": base, "residual_scale": 0.1}],
    })
    rc, err = run_moe(capsys, cfg, tmp_path / "out", "--out-shard-size", "200KB", "--random-seed", 7)
    assert rc == 0, err
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    out = load_dir(tmp_path / "out")
    assert torch.count_nonzero(out["model.layers.0.self_attn.q_proj.bias"]) == 0
    assert out["model.layers.1.mlp.shared_expert_gate.weight"].shape == (1, 64)
    assert torch.isfinite(forward(load(str(tmp_path / "out")))).all()
    # the same seed gives the same bytes
    rc, _ = run_moe(capsys, cfg, tmp_path / "again", "--out-shard-size", "200KB", "--random-seed", 7)
    again = load_dir(tmp_path / "again")
    assert rc == 0 and all(torch.equal(out[k], again[k]) for k in out)


@pytest.mark.parametrize("data, message", [
    ({"experts": [{"source_model": "x"}]}, "base_model: missing"),
    ({"base_model": "B", "experts": []}, "experts: must be a non-empty list"),
    ({"base_model": "B", "gate_mode": "bogus", "experts": ["x"]}, "unknown gate mode"),
    ({"base_model": "B", "gate_mode": "random", "experts": ["x"], "experts_per_token": 2}, "more than the 1"),
    ({"base_model": "B", "experts": [{"source_model": "x"}, {"source_model": "y"}]}, "needs prompts"),
    ({"base_model": "B", "experts": [{"source_model": "x", "positive_prompts": ["a"]},
                                     {"source_model": "y", "positive_prompts": ["a"]}]}, "same prompts"),
    ({"base_model": "B", "gate_mode": "random", "experts": ["x"], "shared_experts": ["y", "z"]}, "at most one"),
    ({"base_model": "B", "gate_mode": "random", "experts": ["x", "y"], "architecture": "deepseek"},
     "unsupported output"),
    ({"base_model": "B", "gate_mode": "random", "experts": ["x"], "bogus": 1}, "unknown key"),
    ({"base_model": "B", "gate_mode": "random", "experts": [{"source_model": "x", "noise_scale": "lots"}]},
     "must be a number"),
    ({"base_model": "QWEN", "gate_mode": "random", "experts": ["QWEN", "QWEN2"]}, "Mixtral output needs Llama"),
    ({"base_model": "LLAMA", "gate_mode": "random", "architecture": "qwen", "experts": ["LLAMA", "LLAMA2"]},
     "exactly one shared expert"),
    ({"base_model": "LLAMA", "gate_mode": "random", "experts": ["LLAMA", "/no/such/model"]}, "no such directory"),
])
def test_bad_config(models_dir, tmp_path, capsys, data, message):
    subst = {"QWEN": models_dir / "qwen2_base", "QWEN2": models_dir / "qwen2_ft0",
             "LLAMA": models_dir / "llama_base", "LLAMA2": models_dir / "llama_ft0"}
    text = yaml.safe_dump(data)
    for k in sorted(subst, key=len, reverse=True):
        text = text.replace(k, str(subst[k]))
    path = tmp_path / "bad.yml"
    path.write_text(text)
    rc, err = run_moe(capsys, str(path), tmp_path / "out")
    errors = [line for line in err.splitlines() if line.startswith("ray-merge: error:")]
    assert rc == 2 and len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_missing_and_malformed_config(tmp_path, capsys):
    rc, err = run_moe(capsys, str(tmp_path / "none.yml"), tmp_path / "out")
    assert rc == 2 and "not found" in err
    (tmp_path / "bad.yml").write_text("base_model: [unclosed\n")
    rc, err = run_moe(capsys, str(tmp_path / "bad.yml"), tmp_path / "out")
    assert rc == 2 and "malformed YAML" in err


def test_example_configs_parse():
    from ray_merge.tools.moe import load_moe_config

    folder = os.path.join(REPO, "configs", "moe")
    names = sorted(os.listdir(folder))
    assert names
    for name in names:
        cfg = load_moe_config(os.path.join(folder, name))
        assert cfg.experts
