"""The README's offline examples run as documented: scripts/make_example_models.py builds the models, then
`ray-merge moe` / `multi` / `extract-lora` on configs/moe/offline-*.yml and configs/multi/offline-*.yml, and
every output loads with transformers (and peft) with nothing missing."""
import glob
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, run_cli

pytestmark = pytest.mark.slow

OFFLINE_MOE = sorted(glob.glob(os.path.join(REPO, "configs", "moe", "offline-*.yml")))
OFFLINE_MULTI = sorted(glob.glob(os.path.join(REPO, "configs", "multi", "offline-*.yml")))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory holding examples_models/, as the repository root does after the README's command; the
    configs name the models relative to it."""
    root = tmp_path_factory.mktemp("examples")
    res = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "make_example_models.py"),
                          "--out", "examples_models"], cwd=root, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"make_example_models.py failed:\n{res.stdout}\n{res.stderr[-4000:]}"
    return root


def ok(res):
    assert res.returncode == 0, f"exit {res.returncode}\nstdout:\n{res.stdout[-3000:]}\nstderr:\n{res.stderr[-4000:]}"
    return res


def load_complete(path):
    """Load with AutoModelForCausalLM, requiring every weight the architecture has to come from the files."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("hello , write a python function", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    return model


def test_example_models_are_seeded(workdir, tmp_path):
    """The documented builder is deterministic and reuses complete output."""
    res = ok(subprocess.run([sys.executable, os.path.join(REPO, "scripts", "make_example_models.py"), "--out",
                             "examples_models"], cwd=workdir, capture_output=True, text=True, timeout=300))
    assert "already" in res.stdout
    with open(workdir / "examples_models" / "examples.json") as f:
        assert json.load(f)["models"] == ["base", "ft-math", "ft-code", "ft-chat"]
    for name in ("base", "ft-math"):
        load_complete(str(workdir / "examples_models" / name))


@pytest.mark.parametrize("config", OFFLINE_MOE, ids=os.path.basename)
def test_offline_moe(workdir, config):
    out = workdir / "examples_out" / os.path.splitext(os.path.basename(config))[0]
    extra = ["--i-understand-this-is-not-useful-without-training"] if "upcycle" in config else []
    ok(run_cli("moe", config, out, "--quiet", *extra, cwd=workdir))
    model = load_complete(str(out))
    arch = json.load(open(out / "config.json"))["architectures"][0]
    assert arch == ("Qwen2MoeForCausalLM" if "qwen" in config else "MixtralForCausalLM")
    assert type(model).__name__ == arch


@pytest.mark.parametrize("config", OFFLINE_MULTI, ids=os.path.basename)
def test_offline_multi(workdir, config):
    out = workdir / "examples_out" / os.path.splitext(os.path.basename(config))[0]
    ok(run_cli("multi", config, out, "--quiet", cwd=workdir))
    stages = sorted(p.name for p in out.iterdir() if (p / "config.json").exists())
    assert "final" in stages and len(stages) >= 2, stages
    for stage in stages:
        load_complete(str(out / stage))


def test_offline_extract_lora(workdir):
    import peft
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    models = workdir / "examples_models"
    adapter = workdir / "examples_out" / "lora-ft-chat"
    res = ok(run_cli("extract-lora", "--model", "examples_models/ft-chat", "--base-model", "examples_models/base",
                     "--out-path", adapter, "--max-rank", "8", cwd=workdir))
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    assert "error" in (res.stdout + res.stderr).lower()  # the per-module reconstruction report

    base = AutoModelForCausalLM.from_pretrained(models / "base", dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(adapter))
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    loaded = {k for k, _ in model.named_parameters() if "lora_" in k}
    assert saved and len(loaded) == sum("lora_" in k for k in saved), (len(loaded), len(saved))
    # the example fine-tunes change their linear weights by rank 4 (plus a little noise): a rank-8 adapter
    # on the base comes close to the fine-tune
    merged = model.merge_and_unload().state_dict()
    target = AutoModelForCausalLM.from_pretrained(models / "ft-chat", dtype=torch.float32).state_dict()
    name = "model.layers.1.mlp.down_proj.weight"
    start = AutoModelForCausalLM.from_pretrained(models / "base", dtype=torch.float32).state_dict()[name]
    remaining = (merged[name] - target[name]).norm() / (target[name] - start).norm()
    assert remaining < 0.2, float(remaining)
