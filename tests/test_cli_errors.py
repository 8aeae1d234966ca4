"""Bad input: one line on stderr naming the problem, exit code 2, no traceback, no output."""
import os
import shutil

from conftest import run_cli, write_recipe

GOOD = """
merge_method: linear
models:
  - model: A
    parameters: {weight: 0.5}
  - model: B
    parameters: {weight: 0.5}
"""


def _check_error(res, out, *fragments):
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    assert not os.path.exists(out)


def test_missing_model_path(tmp_path, models_dir):
    r = write_recipe(tmp_path / "r.yml", GOOD, A=models_dir / "llama_ft0", B=tmp_path / "nowhere")
    _check_error(run_cli("run", r, tmp_path / "out"), tmp_path / "out", "nowhere", "no such directory")


def test_directory_without_weights(tmp_path, models_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(models_dir / "llama_ft0" / "config.json", empty)
    r = write_recipe(tmp_path / "r.yml", GOOD, A=models_dir / "llama_ft0", B=empty)
    _check_error(run_cli("run", r, tmp_path / "out"), tmp_path / "out", "no weights")


def test_corrupt_safetensors_header(tmp_path, models_dir):
    bad = tmp_path / "bad"
    shutil.copytree(models_dir / "llama_ft1", bad)
    f = bad / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\x00garbage!!!!"
    f.write_bytes(bytes(data))
    r = write_recipe(tmp_path / "r.yml", GOOD, A=models_dir / "llama_ft0", B=bad)
    _check_error(run_cli("run", r, tmp_path / "out"), tmp_path / "out", "corrupt safetensors header",
                 "model.safetensors")


def test_shape_mismatch_names_tensor_and_models(tmp_path, models_dir):
    from models import build_model, save_model

    wide = save_model(build_model("llama", hidden=32, layers=4, intermediate=176), str(tmp_path / "wide"))
    r = write_recipe(tmp_path / "r.yml", GOOD, A=models_dir / "llama_ft0", B=wide)
    _check_error(run_cli("run", r, tmp_path / "out"), tmp_path / "out", "different shapes", "wide", "llama_ft0")


def test_different_architectures_need_allow_crimes(tmp_path, models_dir):
    r = write_recipe(tmp_path / "r.yml", GOOD, A=models_dir / "llama_ft0", B=models_dir / "mistral_ft0")
    _check_error(run_cli("run", r, tmp_path / "out"), tmp_path / "out", "--allow-crimes")


def test_layer_range_out_of_range(tmp_path, models_dir):
    text = f"merge_method: passthrough\nslices:\n  - sources: [{{model: {models_dir}/llama_ft0, layer_range: [0, 9]}}]\n"
    r = write_recipe(tmp_path / "r.yml", text)
    _check_error(run_cli("run", r, tmp_path / "out"), tmp_path / "out", "layer_range", "out of range", "4 layers")


def test_malformed_yaml(tmp_path):
    r = write_recipe(tmp_path / "r.yml", "merge_method: [linear\n")
    _check_error(run_cli("run", r, tmp_path / "out"), tmp_path / "out", "r.yml", "malformed YAML")


def test_unknown_method_lists_known(tmp_path):
    r = write_recipe(tmp_path / "r.yml", GOOD.replace("linear", "lineer"), A="a", B="b")
    _check_error(run_cli("run", r, tmp_path / "out"), tmp_path / "out", "merge_method", "lineer", "linear")


def test_missing_required_parameter(tmp_path, models_dir):
    text = GOOD.replace("    parameters: {weight: 0.5}\n  - model: B", "  - model: B")
    r = write_recipe(tmp_path / "r.yml", text, A=models_dir / "llama_ft0", B=models_dir / "llama_ft1")
    _check_error(run_cli("run", r, tmp_path / "out"), tmp_path / "out", "weight", "llama_ft0")


def test_output_location_is_a_file(tmp_path, models_dir):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = write_recipe(tmp_path / "r.yml", GOOD, A=models_dir / "llama_ft0", B=models_dir / "llama_ft1")
    res = run_cli("run", r, blocker / "out")
    assert res.returncode == 2 and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_existing_nonempty_output_is_not_touched(tmp_path, models_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    r = write_recipe(tmp_path / "r.yml", GOOD, A=models_dir / "llama_ft0", B=models_dir / "llama_ft1")
    res = run_cli("run", r, out)
    assert res.returncode == 2 and "not empty" in res.stderr
    assert (out / "precious.txt").read_text() == "keep me"


def test_full_disk_is_reported_before_work(tmp_path, models_dir, monkeypatch, capsys):
    import collections

    from ray_merge import cli
    from ray_merge.output import staging as output

    Usage = collections.namedtuple("Usage", "total used free")
    monkeypatch.setattr(output.shutil, "disk_usage", lambda p: Usage(10**9, 10**9, 1000))
    r = write_recipe(tmp_path / "r.yml", GOOD, A=models_dir / "llama_ft0", B=models_dir / "llama_ft1")
    assert cli.main(["run", r, str(tmp_path / "out"), "--quiet"]) == 2
    assert "not enough disk space" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_memory_budget_too_small(tmp_path, models_dir):
    r = write_recipe(tmp_path / "r.yml", GOOD, A=models_dir / "llama_ft0", B=models_dir / "llama_ft1")
    res = run_cli("run", r, tmp_path / "out", "--memory-budget", "1KB")
    assert res.returncode == 2 and "memory budget" in res.stderr and "Traceback" not in res.stderr
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(f"{tmp_path}/out.ray-merge-partial")


def test_unreachable_ray_address_fails_at_once(tmp_path, models_dir):
    """Ray would retry a dead head address for minutes; a port that refuses is reported before any output."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = write_recipe(tmp_path / "r.yml", GOOD, A=models_dir / "llama_ft0", B=models_dir / "llama_ft1")
    out = tmp_path / "out"
    res = run_cli("run", r, out, "--address", f"127.0.0.1:{port}", timeout=60)
    _check_error(res, out, "cannot reach the Ray cluster", f"127.0.0.1:{port}")
    assert not os.path.exists(f"{out}.ray-merge-partial")
