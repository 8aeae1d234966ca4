"""`ray-merge extract-lora`: PEFT adapters from (fine-tune - base) by truncated SVD."""
from __future__ import annotations

import json
import os

import pytest
import torch
from models import build_model, save_model

from ray_merge import cli

KW = dict(hidden=64, layers=2, intermediate=128, dtype=torch.float32)


def make_pair(root, kind: str, *, rank: int = 4, noise: float = 0.01, embeddings: bool = False,
              extras: bool = True, seed: int = 3) -> tuple[str, str]:
    """A base and a fine-tune whose linear weights differ by a rank-`rank` update plus a little noise."""
    base = build_model(kind, seed=seed, **KW)
    ft = build_model(kind, seed=seed, **KW)
    ft.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            is_embed = "embed" in name or "wte" in name or "wpe" in name or "lm_head" in name
            if p.ndim == 2 and not is_embed:
                m, n = p.shape
                low = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) / rank ** 0.5
                p.add_((0.2 * low + noise * torch.randn(m, n, generator=g)) * p.std())
            elif is_embed and embeddings:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1 and extras:  # norms and biases
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    b = save_model(base, os.path.join(str(root), f"{kind}_base"))
    f = save_model(ft, os.path.join(str(root), f"{kind}_ft"))
    return b, f


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("lora_llama"), "llama")


@pytest.fixture(scope="module")
def qwen_pair(tmp_path_factory):
    # tied embeddings, attention biases, changed embeddings and norms
    return make_pair(tmp_path_factory.mktemp("lora_qwen"), "qwen2", embeddings=True)


IDS = torch.randint(4, 250, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(path_or_model):
    from transformers import AutoModelForCausalLM

    model = path_or_model
    if isinstance(path_or_model, str):
        model = AutoModelForCausalLM.from_pretrained(path_or_model, dtype=torch.float32)
    with torch.no_grad():
        return model(IDS).logits


def adapter_logits(base: str, adapter: str):
    import peft
    from transformers import AutoModelForCausalLM

    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    return logits(model)


def extract(capsys, base, ft, out, *extra) -> tuple[int, str, str]:
    rc = cli.main(["extract-lora", "--model", ft, "--base-model", base, "--out-path", str(out), "--quiet",
                   *map(str, extra)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def report(out) -> dict:
    with open(os.path.join(str(out), "ray_merge_lora_report.json")) as f:
        return json.load(f)


def test_full_rank_reproduces_the_fine_tune(llama_pair, tmp_path, capsys):
    base, ft = llama_pair
    out = tmp_path / "full"
    rc, stdout, _ = extract(capsys, base, ft, out, "--max-rank", 64)
    assert rc == 0
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                       "ray_merge_lora_report.json"]
    # the error table lists every module type
    for key in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert key in stdout
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 64 and cfg["lora_alpha"] == 64
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                             "v_proj"]
    # norms changed: saved at full rank; embeddings identical: left out
    assert set(cfg["modules_to_save"]) == {"input_layernorm", "post_attention_layernorm", "norm"}
    rep = report(out)
    assert max(m["rel_error"] for m in rep["modules"].values()) < 1e-5
    ref = logits(ft)
    assert (logits(base) - ref).abs().max() > 0.05
    torch.testing.assert_close(adapter_logits(base, str(out)), ref, atol=1e-4, rtol=1e-4)


def test_lower_ranks_degrade_gracefully(llama_pair, tmp_path, capsys):
    base, ft = llama_pair
    ref = logits(ft)
    errors, dists = [], []
    for rank in (1, 4, 16):
        out = tmp_path / f"r{rank}"
        rc, _, _ = extract(capsys, base, ft, out, "--max-rank", rank)
        assert rc == 0
        rep = report(out)
        assert {m["rank"] for m in rep["modules"].values()} == {rank}
        errors.append(max(g["rel_error_total"] for g in rep["by_type"].values()))
        dists.append(float((adapter_logits(base, str(out)) - ref).abs().mean()))
    assert errors == sorted(errors, reverse=True) and dists == sorted(dists, reverse=True)
    assert errors[0] > 0.3  # rank 1 of a rank-4 update misses most of it
    assert errors[1] < 0.1  # rank 4 catches all but the noise
    assert dists[-1] < dists[0] / 5


def test_relative_error_matches_the_factors(llama_pair, tmp_path, capsys):
    from safetensors.torch import load_file

    base, ft = llama_pair
    out = tmp_path / "r3"
    assert extract(capsys, base, ft, out, "--max-rank", 3)[0] == 0
    factors = load_file(str(out / "adapter_model.safetensors"))
    b_w, f_w = load_file(os.path.join(base, "model.safetensors")), load_file(os.path.join(ft, "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    delta = f_w[name + ".weight"] - b_w[name + ".weight"]
    approx = factors[f"base_model.model.{name}.lora_B.weight"] @ factors[f"base_model.model.{name}.lora_A.weight"]
    measured = float((delta - approx).norm() / delta.norm())
    assert report(out)["modules"][name]["rel_error"] == pytest.approx(measured, rel=1e-3)


def test_tied_embeddings_biases_and_norms(qwen_pair, tmp_path, capsys):
    base, ft = qwen_pair
    out = tmp_path / "qwen"
    rc, _, err = extract(capsys, base, ft, out, "--max-rank", 64)
    assert rc == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["lora_bias"] is True  # q/k/v biases changed
    assert {"embed_tokens", "lm_head", "norm"} <= set(cfg["modules_to_save"])
    torch.testing.assert_close(adapter_logits(base, str(out)), logits(ft), atol=1e-4, rtol=1e-4)


def test_embed_lora(llama_pair, tmp_path, capsys):
    base, _ = llama_pair
    root = tmp_path / "m"
    b, f = make_pair(root, "llama", embeddings=True, extras=False)
    out = tmp_path / "emb"
    assert extract(capsys, b, f, out, "--max-rank", 64, "--embed-lora")[0] == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert {"embed_tokens", "lm_head"} <= set(cfg["target_modules"])
    assert not cfg["modules_to_save"]
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as h:
        a = h.get_tensor("base_model.model.model.embed_tokens.lora_embedding_A")
        bb = h.get_tensor("base_model.model.model.embed_tokens.lora_embedding_B")
    assert a.shape == (64, 256) and bb.shape == (64, 64)  # (r, vocab), (hidden, r)
    torch.testing.assert_close(adapter_logits(b, str(out)), logits(f), atol=1e-4, rtol=1e-4)


def test_module_selection_and_sv_epsilon(llama_pair, tmp_path, capsys):
    base, ft = llama_pair
    out = tmp_path / "sel"
    rc, stdout, _ = extract(capsys, base, ft, out, "--max-rank", 32, "-i", r"layers\.0\.", "-e", "mlp",
                            "--skip-undecomposable", "--sv-epsilon", 0.05)
    assert rc == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    # only layer 0's attention: full names, since a suffix would also match layer 1
    assert cfg["target_modules"] == sorted(f"model.layers.0.self_attn.{p}" for p in ("k_proj", "o_proj", "q_proj",
                                                                                      "v_proj"))
    assert not cfg["modules_to_save"]
    ranks = {m["rank"] for m in report(out)["modules"].values()}
    assert max(ranks) < 32  # small singular values dropped
    assert cfg["r"] == max(ranks)
    assert all(v == cfg["lora_alpha"] or v < cfg["r"] for v in cfg["rank_pattern"].values())
    assert "mlp" not in stdout
    adapter_logits(base, str(out))  # loads


def test_lowrank_svd(llama_pair, tmp_path, capsys):
    base, ft = llama_pair
    out = tmp_path / "low"
    assert extract(capsys, base, ft, out, "--max-rank", 4, "--svd", "lowrank")[0] == 0
    rep = report(out)
    assert {m["svd"] for m in rep["modules"].values()} == {"lowrank"}
    full = tmp_path / "full4"
    assert extract(capsys, base, ft, full, "--max-rank", 4, "--svd", "full")[0] == 0
    for name, m in report(full)["modules"].items():
        assert rep["modules"][name]["rel_error"] == pytest.approx(m["rel_error"], abs=0.02)


@pytest.mark.slow
def test_ray_workers_match_in_process(llama_pair, tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file

    base, ft = llama_pair
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert extract(capsys, base, ft, local, "--max-rank", 8)[0] == 0
    assert extract(capsys, base, ft, remote, "--max-rank", 8, "--workers", 2)[0] == 0
    a, b = load_file(str(local / "adapter_model.safetensors")), load_file(str(remote / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # singular vectors are unique up to sign; the products are not
        if k.endswith("lora_A.weight"):
            kb = k.replace("lora_A", "lora_B")
            torch.testing.assert_close(b[kb] @ b[k], a[kb] @ a[k], atol=1e-5, rtol=1e-4)
    assert json.loads((local / "adapter_config.json").read_text()) == \
        json.loads((remote / "adapter_config.json").read_text())


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model"], "no such directory"),
    (["--max-rank", "0"], "--max-rank must be at least 1"),
    (["-e", "("], "not a valid regular expression"),
    (["--save-module", "nonesuch"], "no such module"),
    (["-i", "nonesuch"], "no modules selected"),
])
def test_bad_input(llama_pair, tmp_path, capsys, args, message):
    base, ft = llama_pair
    argv = ["extract-lora", "--model", ft, "--base-model", base, "--out-path", str(tmp_path / "o"), *args]
    if "--model" in args:
        argv = ["extract-lora", "--base-model", base, "--out-path", str(tmp_path / "o"), *args]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ray-merge: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_identical_models_and_existing_output(llama_pair, tmp_path, capsys):
    base, ft = llama_pair
    rc, _, err = extract(capsys, base, base, tmp_path / "same")
    assert rc == 2 and "identical" in err and not (tmp_path / "same").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    rc, _, err = extract(capsys, base, ft, tmp_path / "full")
    assert rc == 2 and "already exists" in err


def test_memory_budget_picks_the_svd(llama_pair, tmp_path, capsys):
    from ray_merge.errors import UserError
    from ray_merge.tools.lora import LoraJob, LoraOptions, choose_svd, svd_working_bytes

    job = LoraJob("m", "linear", "m.weight", None, False, (4096, 1024), 2 * 4096 * 1024 * 2)
    full = svd_working_bytes(job, "full", 16)
    low = svd_working_bytes(job, "lowrank", 16)
    assert low < full
    opts = LoraOptions(max_rank=16)
    assert choose_svd(job, opts, full) == "full"
    assert choose_svd(job, opts, low) == "lowrank"
    with pytest.raises(UserError, match="try --svd lowrank"):
        choose_svd(job, LoraOptions(max_rank=16, svd="full"), low)
    base, ft = llama_pair
    rc, _, err = extract(capsys, base, ft, tmp_path / "o", "--memory-budget", "1KB")
    assert rc == 2 and "more than the memory budget" in err and not (tmp_path / "o").exists()


def test_resized_vocabulary_saves_embeddings(tmp_path, capsys):
    base = save_model(build_model("llama", seed=5, **KW), str(tmp_path / "base"))
    ft = save_model(build_model("llama", seed=5, vocab=260, **KW), str(tmp_path / "ft"))
    rc, _, err = extract(capsys, base, ft, tmp_path / "out", "--max-rank", 8, "--embed-lora")
    assert rc == 0
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert {"embed_tokens", "lm_head"} <= set(cfg["modules_to_save"])
    assert "embed_tokens" not in cfg["target_modules"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), "pt") as h:
        assert h.get_slice("base_model.model.model.embed_tokens.weight").get_shape() == [260, 64]
