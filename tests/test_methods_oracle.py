"""Every merge method against mergekit's own implementation (the oracle).

All cases run through mergekit in ONE subprocess of the side virtualenv
(``$MERGEKIT_VENV`` or ``<repo>/.venv-mergekit``); a missing side venv fails
the suite. Deterministic methods must agree within rtol 1e-2 / atol 1e-5 on all
but 0.1% of the elements (the conformance harness's rule); randomised ones must
agree in the fraction of changed entries (within 0.05) and in the mean size of
the changes (within 15%).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ray_merge.methods import get_method
from ray_merge.methods.api import merge_tensors

REPO = Path(__file__).resolve().parents[1]
ORACLE = REPO / "tests" / "oracle" / "mergekit_methods.py"


# ---------------------------------------------------------------- input data


def _datasets() -> dict[str, list[torch.Tensor]]:
    """Named input sets: a base model's tensor first, then fine-tunes of it."""
    g = torch.Generator().manual_seed(1234)

    def family(shape, n=3, scale=0.003, outliers=True, sparse=None):
        base = torch.randn(shape, generator=g) * 0.02
        out = [base]
        for _ in range(n):
            delta = torch.randn(shape, generator=g) * scale
            if outliers:
                delta += (torch.rand(shape, generator=g) < 0.01) * torch.randn(shape, generator=g) * 0.05
            if sparse is not None:
                delta *= torch.rand(shape, generator=g) < sparse
            out.append(base + delta)
        return out

    sets = {
        "mat": family((48, 40)),
        "vec": family((40,)),
        # above the exact-selection size and the radix-select size: the fast paths
        "big": family((520, 256), n=2),
        "sparse": family((48, 40), outliers=False, sparse=0.3),
        "rand": family((256, 256), n=2, outliers=False),
    }
    # bfloat16 inputs: quantised deltas, so many ties at the magnitude boundary
    sets["bf16"] = [t.to(torch.bfloat16) for t in family((48, 40))]
    # bfloat16 checkpoints merged in float32 (the usual recipe): ties again
    sets["quant"] = [t.to(torch.bfloat16).float() for t in family((176, 64))]
    sets["fp16"] = [t.to(torch.float16) for t in family((32, 24))]
    return sets


DATA = _datasets()


# ---------------------------------------------------------------- cases


def _case(method, data, *, n=None, base_index=0, params=None, weights=None, per_model=None,
          tag="", randomized=False, inputs=None):
    tensors = DATA[data]
    idx = list(range(len(tensors) if n is None else n)) if inputs is None else inputs
    k = len(idx)
    model_params = [{} for _ in range(k)]
    others = [i for i in range(k) if i != base_index]
    if weights is not None:
        targets = range(k) if len(weights) == k else others
        for i, w in zip(targets, weights):
            model_params[i]["weight"] = w
    for key, values in (per_model or {}).items():
        for i, v in zip(others, values):
            model_params[i][key] = v
    return {
        "id": f"{method}-{data}{'-' + tag if tag else ''}",
        "method": method,
        "data": data,
        "inputs": [f"{data}.{i}" for i in idx],
        "base_index": base_index,
        "params": params or {},
        "model_params": model_params,
        "seed": 7,
        "name": "model.layers.0.mlp.up_proj.weight",
        "randomized": randomized,
    }


def _cases():
    cases = []
    add = cases.append
    for data in ("mat", "bf16"):
        add(_case("linear", data, base_index=None, weights=[1.0, 0.5, 0.3, 0.2]))
        add(_case("linear", data, base_index=None, weights=[1.0, 0.5, 0.3, 0.2],
                  params={"normalize": False}, tag="sum"))
        add(_case("slerp", data, n=2, params={"t": 0.3}))
        add(_case("slerp", data, n=2, base_index=1, params={"t": 0.75}, tag="base1"))
        add(_case("nuslerp", data, inputs=[1, 2], base_index=None, weights=[1.0, 2.0]))
        add(_case("nuslerp", data, inputs=[1, 2], base_index=None, weights=[1.0, 1.0],
                  params={"nuslerp_flatten": False}, tag="rows"))
        add(_case("nuslerp", data, inputs=[1, 2], base_index=None, weights=[3.0, 1.0],
                  params={"nuslerp_flatten": False, "nuslerp_row_wise": True}, tag="cols"))
        add(_case("nuslerp", data, n=3, weights=[1.0, 2.0], tag="base"))
        add(_case("multislerp", data, weights=[1.0, 0.5, 0.25], tag="base"))
        add(_case("multislerp", data, inputs=[1, 2, 3], base_index=None, weights=[1.0, 0.5, 0.25]))
        add(_case("multislerp", data, inputs=[1, 2], base_index=None, weights=[0.3, 0.3],
                  params={"normalize_weights": False}, tag="raw"))
        add(_case("karcher", data, base_index=None))
        add(_case("karcher", data, inputs=[1, 2], base_index=None,
                  params={"max_iter": 3, "tol": 1e-7}, tag="short"))
        add(_case("task_arithmetic", data, weights=[1.0, 0.5, -0.3], params={"lambda": 0.8}))
        add(_case("task_arithmetic", data, weights=[1.0, 0.5, 0.3], params={"normalize": True},
                  tag="norm"))
        add(_case("ties", data, weights=[1.0, 0.7, 0.5], per_model={"density": [0.5, 0.3, 0.8]}))
        add(_case("ties", data, weights=[1.0, 1.0, 0.5], per_model={"density": [0.2, 0.2, 0.2]},
                  params={"normalize": False, "rescale": True, "int8_mask": True}, tag="rescale"))
        add(_case("breadcrumbs", data, weights=[1.0, 0.5, 0.5],
                  per_model={"density": [0.9, 0.5, 0.95], "gamma": [0.01, 0.1, 0.1]}))
        add(_case("breadcrumbs_ties", data, weights=[1.0, 1.0, 1.0],
                  per_model={"density": [0.9, 0.6, 0.8], "gamma": [0.01, 0.05, 0.0]}))
        add(_case("breadcrumbs_ties", data, weights=[1.0, 0.5, 1.0], per_model={"density": [0.5] * 3},
                  params={"normalize": True, "rescale": True, "lambda": 1.5}, tag="norm"))
        add(_case("sce", data))
        add(_case("sce", data, params={"select_topk": 0.3}, tag="top30"))
        add(_case("model_stock", data))
        add(_case("model_stock", data, params={"filter_wise": True}, tag="rows"))
        add(_case("nearswap", data, n=2, params={"t": 0.001}))
        add(_case("nearswap", data, n=2, params={"t": 0.01}, tag="t01"))
        add(_case("arcee_fusion", data, n=2))
        add(_case("arcee_fusion", data, inputs=[0, 3], tag="ft2"))
        add(_case("passthrough", data, inputs=[2], base_index=None, tag="scaled"))
        cases[-1]["model_params"][0]["scale"] = 0.5
    for method in ("ram", "ramplus_tl"):
        add(_case(method, "sparse"))
        add(_case(method, "sparse", params={"epsilon": 1e-3}, tag="eps"))
    add(_case("ramplus_tl", "sparse", params={"r": 0.5, "alpha": 1.0}, tag="strong"))
    # quantised values, float32 arithmetic: mergekit's order among tied magnitudes
    add(_case("ties", "quant", weights=[1.0, 0.7, 0.5], per_model={"density": [0.5, 0.3, 0.8]}))
    add(_case("breadcrumbs_ties", "quant", weights=[1.0, 1.0, 1.0],
              per_model={"density": [0.9, 0.5, 0.7], "gamma": [0.01, 0.1, 0.05]}))
    add(_case("breadcrumbs", "quant", weights=[1.0, 0.5, 0.5], per_model={"density": [0.6] * 3},
              params={"rescale": True}))
    add(_case("sce", "quant", params={"select_topk": 0.3}))
    add(_case("task_arithmetic", "quant", weights=[1.0, 0.5, 0.3]))
    # float16 recipes
    add(_case("ties", "fp16", weights=[1.0, 0.7, 0.5], per_model={"density": [0.5, 0.3, 0.8]},
              params={"rescale": True}))
    add(_case("task_arithmetic", "fp16", weights=[1.0, 0.5, 0.3], params={"lambda": 0.7}))
    add(_case("breadcrumbs_ties", "fp16", weights=[1.0, 1.0, 1.0], per_model={"density": [0.8] * 3}))
    add(_case("sce", "fp16", params={"select_topk": 0.5}))
    add(_case("slerp", "fp16", n=2, params={"t": 0.4}))
    add(_case("nuslerp", "fp16", n=3, weights=[1.0, 2.0]))
    add(_case("multislerp", "fp16", weights=[1.0, 0.5, 0.25]))
    add(_case("karcher", "fp16", base_index=None))
    add(_case("model_stock", "fp16"))
    add(_case("linear", "fp16", base_index=None, weights=[1.0, 0.5, 0.3, 0.2]))
    # 1-D tensors
    add(_case("ties", "vec", weights=[1.0, 0.7, 0.5], per_model={"density": [0.5, 0.3, 0.8]}))
    add(_case("breadcrumbs", "vec", weights=[1.0, 1.0, 1.0], per_model={"density": [0.7] * 3,
                                                                        "gamma": [0.1] * 3}))
    add(_case("model_stock", "vec", params={"filter_wise": True}))
    add(_case("nuslerp", "vec", inputs=[1, 2], base_index=None, weights=[1.0, 2.0],
              params={"nuslerp_flatten": False}))
    add(_case("arcee_fusion", "vec", n=2))
    add(_case("sce", "vec", params={"select_topk": 0.5}))
    # large tensors: linear-time selection and exact quantiles
    add(_case("ties", "big", weights=[1.0, 0.6], per_model={"density": [0.4, 0.7]}))
    add(_case("breadcrumbs_ties", "big", weights=[1.0, 1.0],
              per_model={"density": [0.8, 0.5], "gamma": [0.02, 0.1]}))
    add(_case("sce", "big", params={"select_topk": 0.3}))
    add(_case("arcee_fusion", "big", n=2))
    # randomised methods: compared by statistics
    for method, per_model, params, tag in (
        ("dare_ties", {"density": [0.5, 0.5]}, {}, ""),
        ("dare_ties", {"density": [0.3, 0.7]}, {"normalize": True, "lambda": 0.5}, "norm"),
        ("dare_linear", {"density": [0.3, 0.6]}, {}, ""),
        ("dare_linear", {"density": [0.5, 0.5]}, {"rescale": False}, "plain"),
        ("della", {"density": [0.5, 0.5], "epsilon": [0.15, 0.15]}, {}, ""),
        ("della", {"density": [0.4, 0.6], "epsilon": [0.3, 0.1]}, {"normalize": False}, "sum"),
        ("della_linear", {"density": [0.6, 0.4], "epsilon": [0.2, 0.1]}, {}, ""),
    ):
        add(_case(method, "rand", weights=[1.0, 0.8], per_model=per_model, params=params,
                  tag=tag, randomized=True))
    ids = [c["id"] for c in cases]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    return cases


CASES = _cases()
DETERMINISTIC = [c for c in CASES if not c["randomized"]]
RANDOMIZED = [c for c in CASES if c["randomized"]]


def test_every_method_is_covered():
    from ray_merge.methods import all_methods

    covered = {c["method"] for c in CASES}
    assert covered == set(all_methods()), set(all_methods()) ^ covered
    for c in CASES:
        assert get_method(c["method"]).randomized == c["randomized"], c["id"]


# ---------------------------------------------------------------- the oracle run


def _side_python() -> Path:
    venv = Path(os.environ.get("MERGEKIT_VENV") or REPO / ".venv-mergekit")
    python = venv / "bin" / "python"
    if not python.exists():
        pytest.fail(
            f"no mergekit side virtualenv at {venv}: create it (python -m venv .venv-mergekit && "
            f".venv-mergekit/bin/pip install mergekit) or set MERGEKIT_VENV"
        )
    return python


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    python = _side_python()
    work = tmp_path_factory.mktemp("oracle")
    tensors = {
        f"{name}.{i}": t.contiguous() for name, ts in DATA.items() for i, t in enumerate(ts)
    }
    save_file(tensors, str(work / "inputs.safetensors"))
    spec = {"cases": [{k: v for k, v in c.items() if k not in ("data", "randomized")} for c in CASES]}
    (work / "spec.json").write_text(json.dumps(spec))
    out = work / "outputs.safetensors"
    proc = subprocess.run(
        [str(python), str(ORACLE), str(work / "spec.json"), str(work / "inputs.safetensors"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        pytest.fail(f"mergekit oracle failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    errors = json.loads(Path(str(out) + ".errors.json").read_text())
    return load_file(str(out)), errors


def _ours(case) -> torch.Tensor:
    tensors = [DATA[case["data"]][int(name.rsplit(".", 1)[1])] for name in case["inputs"]]
    return merge_tensors(
        case["method"],
        tensors,
        base_index=case["base_index"],
        params=case["params"],
        model_params=case["model_params"],
        seed=case["seed"],
        name=case["name"],
    )


def _reference(case, oracle) -> torch.Tensor:
    outputs, errors = oracle
    if case["id"] in errors:
        pytest.fail(f"mergekit raised on {case['id']}: {errors[case['id']]}")
    return outputs[case["id"]]


# ---------------------------------------------------------------- comparisons


@pytest.mark.parametrize("case", DETERMINISTIC, ids=[c["id"] for c in DETERMINISTIC])
def test_matches_mergekit(case, oracle):
    ref = _reference(case, oracle)
    got = _ours(case)
    assert got.shape == ref.shape
    assert got.dtype == ref.dtype  # mergekit writes what the method returns when out_dtype is unset
    a, b = ref.float(), got.float()
    assert torch.isfinite(b).all()
    bad = (a - b).abs() > 1e-5 + 1e-2 * a.abs()
    frac = bad.float().mean().item()
    assert frac <= 1e-3, (
        f"{case['id']}: {frac:.3%} of elements off, max abs diff {(a - b).abs().max().item():.3g}"
    )


def _change_stats(out: torch.Tensor, base: torch.Tensor, clamp_at: float):
    delta = out.float() - base.float()
    changed = delta != 0
    fraction = changed.float().mean().item()
    size = delta.abs().clamp(max=clamp_at)[changed].mean().item() if fraction > 0 else 0.0
    return fraction, size


@pytest.mark.parametrize("case", RANDOMIZED, ids=[c["id"] for c in RANDOMIZED])
def test_random_methods_match_mergekit_statistics(case, oracle):
    ref = _reference(case, oracle)
    got = _ours(case)
    assert got.shape == ref.shape
    base = DATA[case["data"]][case["base_index"]]
    clamp_at = (ref.float() - base.float()).abs().flatten().quantile(0.99).item()
    f_ref, m_ref = _change_stats(ref, base, clamp_at)
    f_got, m_got = _change_stats(got, base, clamp_at)
    assert abs(f_ref - f_got) <= 0.05, (f_got, f_ref)
    assert m_ref > 0 and abs(m_got - m_ref) / m_ref <= 0.15, (m_got, m_ref)
    # and not trivially equal to the base or to a deterministic method
    assert 0.05 < f_got < 1.0
