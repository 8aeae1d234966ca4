"""Hostile recipes (issue #14) and parameters a method ignores (issue #10), through the command line.

A hostile recipe gives exit code 2 and one stderr line naming the file and the key, no traceback, and
nothing written: neither OUT nor OUT.ray-merge-partial.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from conftest import load_dir, run_cli, write_recipe

from ray_merge.units import parse_size

SECRET = "hunter2-not-for-outputs"


def _recipe(method: str, p0: str = "weight: 0.5", p1: str = "weight: 0.5", glob: str = "", extra: str = "") -> str:
    return (f"merge_method: {method}\nbase_model: M/llama_base\nmodels:\n"
            f"  - model: M/llama_ft0\n    parameters: {{{p0}}}\n"
            f"  - model: M/llama_ft1\n    parameters: {{{p1}}}\n"
            f"parameters: {{{glob}}}\ndtype: float32\n{extra}")


def _slerp(t) -> str:
    return (f"merge_method: slerp\nbase_model: M/llama_ft0\nmodels:\n  - model: M/llama_ft0\n  - model: M/llama_ft1\n"
            f"parameters: {{t: {t}}}\ndtype: float32\n")


HOSTILE = {
    # NaN and infinity, as a scalar, a gradient point and a filter value
    "weight-nan": (_recipe("task_arithmetic", p0="weight: .nan"), "models[0].parameters.weight", "finite"),
    "weight-inf": (_recipe("task_arithmetic", p0="weight: .inf"), "models[0].parameters.weight", "finite"),
    "density-nan": (_recipe("ties", p0="weight: 1, density: .nan"), "models[0].parameters.density", "finite"),
    "gradient-nan": (_recipe("task_arithmetic", p0="weight: [0.1, .nan]"), "models[0].parameters.weight[1]",
                     "finite"),
    "filter-inf": (_recipe("task_arithmetic", p0="weight: [{filter: mlp, value: -.inf}, {value: 1}]"),
                   "models[0].parameters.weight[0].value", "finite"),
    # out of range
    "density-negative": (_recipe("ties", p0="weight: 1, density: -0.5"), "models[0].parameters.density",
                         "between 0 and 1"),
    "density-above-1": (_recipe("dare_ties", p1="weight: 1, density: 1.5"), "models[1].parameters.density",
                        "between 0 and 1"),
    "slerp-t-5": (_slerp(5), "parameters.t", "between 0 and 1"),
    "slerp-t-negative": (_slerp(-3), "parameters.t", "between 0 and 1"),
    "select-topk-negative": (_recipe("sce", glob="select_topk: -1"), "parameters.select_topk", "between 0 and 1"),
    "karcher-max-iter-negative": (
        "merge_method: karcher\nmodels:\n  - model: M/llama_ft0\n  - model: M/llama_ft1\nparameters: {max_iter: -5}\n",
        "parameters.max_iter", "at least 0"),
    "karcher-max-iter-fraction": (
        "merge_method: karcher\nmodels:\n  - model: M/llama_ft0\n  - model: M/llama_ft1\nparameters: {max_iter: 2.5}\n",
        "parameters.max_iter", "whole number"),
    "gamma-above-1": (_recipe("breadcrumbs", p0="weight: 1, gamma: 2"), "models[0].parameters.gamma",
                      "between 0 and 1"),
    # not numbers, too large
    "weight-abc": (_recipe("task_arithmetic", p0="weight: abc"), "models[0].parameters.weight", "must be a number"),
    "density-high": (_recipe("ties", p0="weight: 1, density: high"), "models[0].parameters.density",
                     "must be a number"),
    "normalize-maybe": (_recipe("ties", glob="normalize: maybe"), "parameters.normalize", "true or false"),
    "weight-1e308": (_recipe("ties", p0="weight: 1e308, density: 0.5"), "models[0].parameters.weight",
                     "overflows the compute dtype float32"),
    "weight-1e5-no-dtype": (_recipe("ties", p0="weight: 1e5").replace("dtype: float32\n", ""),
                            "models[0].parameters.weight", "overflow"),
    # a parameter no method takes
    "typo": (_recipe("task_arithmetic", p0="wieght: 0.5"), "models[0].parameters.wieght", "did you mean 'weight'"),
    # resolvers: the environment must not reach the outputs
    "oc-env": (_recipe("linear", extra="name: ${oc.env:SECRET}\n"), "name", "resolver"),
    "oc-env-default": (_recipe("linear", extra="name: x-${oc.env:NOT_SET_ANYWHERE,abc}\n"), "name", "resolver"),
    "oc-env-in-parameter": (_recipe("linear", glob="normalize: true").replace(
        "parameters: {normalize: true}", "parameters:\n  normalize: ${oc.decode:'true'}"),
        "parameters.normalize", "resolver"),
    # chat templates that would grow to gigabytes or never end
    "chat-nested-loop": (_recipe("linear", extra="chat_template: \"{% for a in range(100000) %}{% for b in "
                                                 "range(100000) %}x{% endfor %}{% endfor %}\"\n"),
                         "chat_template", "more than"),
    "chat-string-times": (_recipe("linear", extra="chat_template: \"{{ 'x' * 4000000000 }}\"\n"),
                          "chat_template", "more than"),
}


def _assert_refused(proc, path, key, fragment, out):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr
    assert str(path) in lines[0] and key in lines[0] and fragment in lines[0], lines[0]
    assert not os.path.exists(out) and not os.path.exists(f"{out}.ray-merge-partial")
    assert SECRET not in proc.stderr + proc.stdout


def _run_in_process(capsys, *args):
    """`ray-merge ARGS` in this process (the checks here never reach a tensor): fast, same main()."""
    from ray_merge.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_recipe_is_one_line_and_writes_nothing(tmp_path, models_dir, name, capsys, monkeypatch):
    text, key, fragment = HOSTILE[name]
    path = write_recipe(tmp_path / "recipe.yml", text, M=models_dir)
    out = tmp_path / "out"
    monkeypatch.setenv("SECRET", SECRET)
    _assert_refused(_run_in_process(capsys, "run", path, out), path, key, fragment, out)


@pytest.mark.parametrize("name", ["weight-nan", "oc-env", "chat-string-times"])
def test_hostile_recipe_through_the_command(tmp_path, models_dir, name):
    """A few of the same through a real `ray-merge` process: exit code and stderr as a user sees them."""
    text, key, fragment = HOSTILE[name]
    path = write_recipe(tmp_path / "recipe.yml", text, M=models_dir)
    out = tmp_path / "out"
    _assert_refused(run_cli("run", path, out, env={"SECRET": SECRET}), path, key, fragment, out)


def test_set_cannot_inject_a_resolver(tmp_path, models_dir):
    path = write_recipe(tmp_path / "recipe.yml", _recipe("linear"), M=models_dir)
    out = tmp_path / "out"
    proc = run_cli("run", path, out, "--set", "name=${oc.env:SECRET}", env={"SECRET": SECRET})
    _assert_refused(proc, path, "name", "resolver", out)
    proc = run_cli("run", path, out, "--set", "models.0.parameters.weight=${oc.env:SECRET}", env={"SECRET": SECRET})
    _assert_refused(proc, path, "models[0].parameters.weight", "resolver", out)


def test_plain_references_still_resolve(tmp_path, models_dir):
    """``${key}`` references are plain data, not resolvers: still allowed."""
    from ray_merge.recipe.load import load_recipe

    text = _recipe("ties", glob="lambda: 1").replace(
        "parameters: {lambda: 1}", "parameters:\n  lambda: ${models[0].parameters.weight}")
    text += "name: \\${oc.env:SECRET}\n"
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yml", text, M=models_dir))
    assert recipe.parameters["lambda"] == 0.5
    assert recipe.raw["name"] == "${oc.env:SECRET}"  # escaped: a literal string


def test_out_shard_size_overflow_is_an_argument_error(tmp_path, models_dir):
    path = write_recipe(tmp_path / "recipe.yml", _recipe("linear"), M=models_dir)
    out = tmp_path / "out"
    proc = run_cli("run", path, out, "--out-shard-size", "1e400")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--out-shard-size" in proc.stderr.strip().splitlines()[-1] and "1e400" in proc.stderr
    assert not os.path.exists(out) and not os.path.exists(f"{out}.ray-merge-partial")


@pytest.mark.parametrize("value", ["1e400", "inf", "nan", "-5B", "0", "abc", "1e400GiB"])
def test_parse_size_refuses(value):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        parse_size(value)


def test_parse_size_accepts():
    assert parse_size("5B") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1e9") == 10**9
    assert parse_size("100KB") == 100_000


# Parameters that a merge method ignores, as mergekit does (issue #10): (recipe with, recipe without, name)
UNUSED = {
    "slerp-weight": (_slerp(0.3).replace("  - model: M/llama_ft1\n",
                                         "  - model: M/llama_ft1\n    parameters: {weight: 0.7}\n"),
                     _slerp(0.3), "weight"),
    "linear-t": (_recipe("linear", glob="t: 0.5").replace("base_model: M/llama_base\n", ""),
                 _recipe("linear").replace("base_model: M/llama_base\n", ""), "t"),
    "nuslerp-normalize": (_recipe("nuslerp", glob="normalize: true"), _recipe("nuslerp"), "normalize"),
}


@pytest.mark.parametrize("name", sorted(UNUSED))
def test_parameter_the_method_ignores_is_a_warning(tmp_path, models_dir, name):
    with_key, without_key, param = UNUSED[name]
    out = {}
    for label, text in (("with", with_key), ("without", without_key)):
        path = write_recipe(tmp_path / f"{label}.yml", text, M=models_dir)
        proc = run_cli("run", path, tmp_path / label)
        assert proc.returncode == 0, proc.stderr[-2000:]
        warnings = [line for line in proc.stderr.splitlines() if "ignores parameter" in line]
        if label == "with":
            assert len(warnings) == 1 and f"'{param}'" in warnings[0] and path in warnings[0], proc.stderr
        else:
            assert not warnings
        out[label] = load_dir(tmp_path / label)
    assert out["with"].keys() == out["without"].keys()
    for k, v in out["with"].items():
        assert torch.equal(v, out["without"][k]), k


def test_ignored_parameter_never_reaches_the_method(tmp_path):
    from ray_merge.recipe.load import recipe_from_dict

    recipe = recipe_from_dict({"merge_method": "slerp", "base_model": "a", "parameters": {"t": 0.5, "weight": 2},
                               "models": [{"model": "a"}, {"model": "b", "parameters": {"weight": 0.3}}]})
    assert recipe.parameters == {"t": 0.5}
    assert all(src.parameters == {} for src in recipe.slices[0].sources)
    assert recipe.raw["parameters"]["weight"] == 2  # the recipe as written is kept for the output's config
