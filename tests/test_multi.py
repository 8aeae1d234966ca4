"""`ray-merge multi`: several dependent recipes in one file (mergekit-multi format)."""
from __future__ import annotations

import os

import pytest
import torch
from conftest import load_dir

from ray_merge import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

THREE = """\
name: first
merge_method: linear
models:
  - model: M/llama_ft0
    parameters: {weight: 0.5}
  - model: M/llama_ft1
    parameters: {weight: 0.5}
dtype: float32
---
# a passthrough stack: layers of the first stage under layers of another model
name: second
merge_method: passthrough
slices:
  - sources: [{model: first, layer_range: [0, 2]}]
  - sources: [{model: M/llama_ft2, layer_range: [2, 4]}]
dtype: float32
---
merge_method: linear
models:
  - model: first
    parameters: {weight: WEIGHT}
  - model: second
    parameters: {weight: 0.5}
dtype: float32
"""


def write(tmp_path, models_dir, text: str = THREE, weight: float = 0.5, name: str = "multi.yml") -> str:
    path = tmp_path / name
    path.write_text(text.replace("M/", f"{models_dir}/").replace("WEIGHT", str(weight)))
    return str(path)


def run(capsys, *args) -> tuple[int, str, str]:
    rc = cli.main(["multi", *map(str, args), "--quiet"])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def statuses(stdout: str) -> dict:
    return {line.split()[0]: line.split()[1] for line in stdout.splitlines() if line.strip()}


def test_three_stages_then_rerun_skips(models_dir, tmp_path, capsys):
    recipe = write(tmp_path, models_dir)
    out = tmp_path / "merges"
    rc, stdout, err = run(capsys, recipe, out)
    assert rc == 0, err
    assert statuses(stdout) == {"first": "merged", "second": "merged", "(final)": "merged"}
    ft0, ft1, ft2 = (load_dir(models_dir / f"llama_ft{i}") for i in range(3))
    first, second, final = (load_dir(out / n) for n in ("first", "second", "final"))
    name0, name3 = "model.layers.0.mlp.up_proj.weight", "model.layers.3.mlp.up_proj.weight"
    torch.testing.assert_close(first[name0], (ft0[name0].float() + ft1[name0].float()) / 2)
    torch.testing.assert_close(second[name0], first[name0])
    torch.testing.assert_close(second[name3], ft2[name3].float())
    torch.testing.assert_close(final[name3], (first[name3] + second[name3]) / 2)
    # the final recipe as written names the stage outputs
    assert str(out / "first") in (out / "final" / "ray_merge_config.yml").read_text()

    mtimes = {n: os.path.getmtime(out / n / "model.safetensors.index.json") for n in ("first", "second", "final")}
    rc, stdout, _ = run(capsys, recipe, out)
    assert rc == 0
    assert statuses(stdout) == {"first": "skipped", "second": "skipped", "(final)": "skipped"}
    assert mtimes == {n: os.path.getmtime(out / n / "model.safetensors.index.json") for n in mtimes}

    # an edited recipe rebuilds that stage only (and what depends on it)
    recipe = write(tmp_path, models_dir, weight=0.25)
    rc, stdout, err = run(capsys, recipe, out)
    assert rc == 0, err
    assert statuses(stdout) == {"first": "skipped", "second": "skipped", "(final)": "merged"}
    final = load_dir(out / "final")
    torch.testing.assert_close(final[name3], (0.25 * first[name3] + 0.5 * second[name3]) / 0.75)

    rc, stdout, _ = run(capsys, recipe, out, "--no-lazy")
    assert rc == 0 and set(statuses(stdout).values()) == {"merged"}


def test_upstream_change_rebuilds_downstream(models_dir, tmp_path, capsys):
    out = tmp_path / "merges"
    assert run(capsys, write(tmp_path, models_dir), out)[0] == 0
    text = THREE.replace("{weight: 0.5}\n  - model: M/llama_ft1", "{weight: 0.7}\n  - model: M/llama_ft1")
    rc, stdout, _ = run(capsys, write(tmp_path, models_dir, text), out)
    assert rc == 0
    assert statuses(stdout) == {"first": "merged", "second": "merged", "(final)": "merged"}


def test_failed_stage_keeps_finished_ones(models_dir, tmp_path, capsys):
    broken = THREE.replace("M/llama_ft2", "M/no_such_model")
    out = tmp_path / "merges"
    rc, stdout, err = run(capsys, write(tmp_path, models_dir, broken), out)
    assert rc == 2 and "no_such_model" in err
    assert (out / "first" / "config.json").exists() and not (out / "second").exists()
    rc, stdout, err = run(capsys, write(tmp_path, models_dir), out, "--out-path", tmp_path / "elsewhere")
    assert rc == 0, err
    assert statuses(stdout) == {"first": "skipped", "second": "merged", "(final)": "merged"}
    assert (tmp_path / "elsewhere" / "config.json").exists()


def test_existing_foreign_output_is_kept(models_dir, tmp_path, capsys):
    """As mergekit-multi: a stage whose output directory already holds a model is not rerun."""
    import shutil

    out = tmp_path / "merges"
    out.mkdir()
    shutil.copytree(models_dir / "llama_ft2", out / "first")
    rc, stdout, err = run(capsys, write(tmp_path, models_dir), out)
    assert rc == 0, err
    assert statuses(stdout)["first"] == "skipped"
    second = load_dir(out / "second")
    torch.testing.assert_close(second["model.layers.0.mlp.up_proj.weight"],
                               load_dir(models_dir / "llama_ft2")["model.layers.0.mlp.up_proj.weight"].float())


INDEPENDENT = THREE.replace("sources: [{model: first, layer_range: [0, 2]}]",
                            "sources: [{model: M/llama_ft0, layer_range: [0, 2]}]")


@pytest.mark.slow
def test_ray_workers_run_independent_stages(models_dir, tmp_path, capsys, monkeypatch):
    recipe = write(tmp_path, models_dir, INDEPENDENT)  # first and second can run at once
    rc, stdout, err = run(capsys, recipe, tmp_path / "ray", "--workers", 2)
    assert rc == 0, err
    assert set(statuses(stdout).values()) == {"merged"}
    assert run(capsys, recipe, tmp_path / "serial")[0] == 0
    for stage in ("first", "second", "final"):
        a, b = load_dir(tmp_path / "ray" / stage), load_dir(tmp_path / "serial" / stage)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


CYCLE = "name: a\nmerge_method: linear\nmodels: [{model: b}]\n---\nname: b\nmerge_method: linear\nmodels: [{model: a}]\n"


@pytest.mark.parametrize("text, message", [
    (CYCLE, "cycle: a -> b -> a"),
    ("name: a\nmerge_method: linear\nmodels: [{model: a}]\n", "uses its own output"),
    ("name: a\nmerge_method: linear\nmodels: [{model: x}]\n---\nname: a\nmerge_method: linear\nmodels: [{model: y}]\n",
     "two recipes are named 'a'"),
    ("merge_method: linear\nmodels: [{model: x}]\n---\nmerge_method: linear\nmodels: [{model: y}]\n",
     "only one recipe may be left without a name"),
    ("name: a\nmerge_method: nope\nmodels: [{model: x}]\n", "(stage a): merge_method: unknown merge method"),
    ("name: ../up\nmerge_method: linear\nmodels: [{model: x}]\n", "plain directory name"),
    ("name: a\nmerge_method: linear\nmodels: [{model: x\n", "malformed YAML"),
    ("- just\n- a list\n", "must be a recipe"),
])
def test_bad_file(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yml"
    path.write_text(text)
    rc, _, err = run(capsys, path, tmp_path / "out")
    errors = [line for line in err.splitlines() if line.startswith("ray-merge: error:")]
    assert rc == 2 and len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_bad_arguments(tmp_path, capsys):
    assert run(capsys, tmp_path / "missing.yml", tmp_path / "out")[0] == 2
    path = tmp_path / "m.yml"
    path.write_text("name: a\nmerge_method: linear\nmodels: [{model: x}]\n")
    rc, _, err = run(capsys, path)
    assert rc == 2 and "needs an output directory" in err
    rc, _, err = run(capsys, path, tmp_path / "out", "--workers", 0)
    assert rc == 2 and "--workers" in err


def test_example_config_loads(tmp_path):
    from ray_merge.tools.multi import load_multi

    plan = load_multi(os.path.join(REPO, "configs", "multi", "three-stage.yml"), str(tmp_path))
    assert [s.label for s in plan.stages] == ["first-merge", "second-merge", "(final)"]
    assert plan.stages[-1].deps == ["first-merge", "second-merge"]
    assert plan.stages[-1].recipe.slices[0].sources[0].model.path == str(tmp_path / "first-merge")
