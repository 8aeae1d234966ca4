"""End-to-end merges with the in-process engine on small local models."""
import json
import os

import pytest
import torch
from conftest import load_dir, run_cli, write_recipe

LINEAR = """
merge_method: linear
models:
  - model: M/llama_ft0
    parameters: {weight: 0.7}
  - model: M/llama_ft1
    parameters: {weight: 0.3}
dtype: float32
out_dtype: bfloat16
"""


def _merge(tmp_path, models_dir, text, *flags, name="out"):
    recipe = write_recipe(tmp_path / f"{name}.yml", text, **{"M/": f"{models_dir}/"})
    out = tmp_path / name
    res = run_cli("run", recipe, out, "--quiet", *flags)
    assert res.returncode == 0, res.stderr
    return out


def test_linear_values_and_hf_loadable(tmp_path, models_dir):
    out = _merge(tmp_path, models_dir, LINEAR)
    got = load_dir(out)
    a, b = load_dir(models_dir / "llama_ft0"), load_dir(models_dir / "llama_ft1")
    assert set(got) == set(a)
    for k in a:
        want = 0.7 * a[k].float() + 0.3 * b[k].float()
        assert got[k].dtype == torch.bfloat16
        # exact up to the final bf16 rounding
        torch.testing.assert_close(got[k].float(), want, rtol=2**-8, atol=1e-7)
        if not torch.equal(a[k], b[k]):
            assert not torch.equal(got[k], a[k].to(torch.bfloat16)), k

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("w1 w2 w3", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, 3, 256)
    cfg = json.load(open(out / "config.json"))
    assert cfg["torch_dtype"] == "bfloat16" and cfg["num_hidden_layers"] == 4
    card = (out / "README.md").read_text()
    assert card.startswith("---") and "- merge" in card and "llama_ft0" in card
    manifest = json.load(open(out / "ray_merge_manifest.json"))
    assert manifest["merge_method"] == "linear" and len(manifest["shards"]) == 1
    assert not os.path.exists(str(out) + ".ray-merge-partial")


def test_sharded_output_is_deterministic(tmp_path, models_dir):
    o1 = _merge(tmp_path, models_dir, LINEAR, "--out-shard-size", "60KB", name="a")
    o2 = _merge(tmp_path, models_dir, LINEAR, "--out-shard-size", "60KB", name="b")
    shards = sorted(f for f in os.listdir(o1) if f.endswith(".safetensors"))
    assert len(shards) > 3
    index = json.load(open(o1 / "model.safetensors.index.json"))
    assert set(index["weight_map"].values()) == set(shards)
    for f in shards:
        assert (o1 / f).read_bytes() == (o2 / f).read_bytes()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(o1)


def test_passthrough_slices_renumber_layers(tmp_path, models_dir):
    text = """
merge_method: passthrough
slices:
  - sources: [{model: M/qwen2_ft0, layer_range: [0, 3]}]
  - sources: [{model: M/qwen2_ft1, layer_range: [1, 4]}]
dtype: bfloat16
"""
    out = _merge(tmp_path, models_dir, text)
    got = load_dir(out)
    a, b = load_dir(models_dir / "qwen2_ft0"), load_dir(models_dir / "qwen2_ft1")
    cfg = json.load(open(out / "config.json"))
    assert cfg["num_hidden_layers"] == 6
    assert len(cfg.get("layer_types", [0] * 6)) == 6
    suffix = "self_attn.q_proj.bias"  # qwen2 has attention biases
    assert torch.equal(got[f"model.layers.2.{suffix}"], a[f"model.layers.2.{suffix}"])
    assert torch.equal(got[f"model.layers.3.{suffix}"], b[f"model.layers.1.{suffix}"])
    assert torch.equal(got[f"model.layers.5.{suffix}"], b[f"model.layers.3.{suffix}"])
    assert "lm_head.weight" not in got  # tied embeddings stay tied
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(out)
    assert len(m.model.layers) == 6


def test_gpt2_and_bin_inputs(tmp_path, models_dir):

    import shutil

    bin_dir = tmp_path / "gpt2_bin"
    bin_dir.mkdir()
    shutil.copy(models_dir / "gpt2_ft1" / "config.json", bin_dir)
    torch.save(load_dir(models_dir / "gpt2_ft1"), bin_dir / "pytorch_model.bin")
    text = f"""
merge_method: linear
models:
  - model: M/gpt2_ft0
    parameters: {{weight: 1.0}}
  - model: {bin_dir}
    parameters: {{weight: 1.0}}
dtype: float32
"""
    out = _merge(tmp_path, models_dir, text)
    got = load_dir(out)
    a = load_dir(models_dir / "gpt2_ft0")
    b = torch.load(bin_dir / "pytorch_model.bin", weights_only=True)
    k = "transformer.h.1.mlp.c_fc.weight"
    assert torch.allclose(got[k].float(), (a[k].float() + b[k].float()) / 2, atol=1e-6)


def test_hub_reference_resolved_from_cache(tmp_path, models_dir):
    """`org/name@rev` goes through huggingface_hub (offline here: its cache)."""
    import shutil

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "models--acme--tiny" / "snapshots" / commit
    shutil.copytree(models_dir / "llama_ft0", snap)
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text(commit)
    text = LINEAR.replace("M/llama_ft0", "acme/tiny@main")
    recipe = write_recipe(tmp_path / "hub.yml", text, **{"M/": f"{models_dir}/"})
    res = run_cli("run", recipe, tmp_path / "out", "--quiet", env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr
    assert load_dir(tmp_path / "out")


def test_plan_summary(tmp_path, models_dir):
    recipe = write_recipe(tmp_path / "r.yml", LINEAR, **{"M/": f"{models_dir}/"})
    res = run_cli("plan", recipe, "--out-shard-size", "100KB")
    assert res.returncode == 0, res.stderr
    assert "tensors:       39" in res.stdout and "shards:" in res.stdout and "peak working set" in res.stdout


def test_resume_after_interruption(tmp_path, models_dir, monkeypatch):
    """A failure mid-merge leaves no finished-looking output; --resume reuses finished shards."""
    from ray_merge.engine import run_merge
    from ray_merge.execute import stream
    from ray_merge.options import MergeOptions
    from ray_merge.recipe.load import load_recipe

    recipe = load_recipe(write_recipe(tmp_path / "r.yml", LINEAR, **{"M/": f"{models_dir}/"}))
    out = tmp_path / "out"
    opts = MergeOptions(out_shard_bytes=60_000, quiet=True)
    real = stream.compute_tensor
    calls = {"n": 0}

    def flaky(pt, inputs, seed, device="cpu"):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real(pt, inputs, seed, device)

    monkeypatch.setattr(stream, "compute_tensor", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_merge(recipe, str(out), opts)
    assert not out.exists()
    stage = tmp_path / "out.ray-merge-partial"
    finished = {f: (stage / f).stat().st_mtime_ns for f in os.listdir(stage) if f.endswith(".safetensors")}
    assert finished and not any(f.endswith(".tmp") for f in os.listdir(stage))
    monkeypatch.setattr(stream, "compute_tensor", real)
    with pytest.raises(Exception, match="--resume"):
        run_merge(recipe, str(out), opts)
    opts.resume = True
    run_merge(recipe, str(out), opts)
    for f, mtime in finished.items():
        assert (out / f).stat().st_mtime_ns == mtime  # not rewritten
    ref = _merge(tmp_path, models_dir, LINEAR, "--out-shard-size", "60KB", name="ref")
    for f in os.listdir(ref):
        if f.endswith(".safetensors"):
            assert (ref / f).read_bytes() == (out / f).read_bytes()
