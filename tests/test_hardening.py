"""Hostile or unlucky files and outputs (issue #14): malformed safetensors headers, index entries outside
the model, integer tensors, corrupted or stale partial outputs, two runs at once, symlinked outputs, a
full disk, failures mid-merge. Each gives one line and exit code 2 (or recovers), never an output that
looks complete."""
import collections
import json
import os
import shutil

import pytest
import torch
from conftest import run_cli, write_recipe
from safetensors.torch import load_file, save_file

from ray_merge import cli
from ray_merge.engine import run_merge
from ray_merge.errors import UserError
from ray_merge.execute import stream
from ray_merge.execute.local import run_in_process
from ray_merge.io import writer
from ray_merge.options import MergeOptions
from ray_merge.output import staging
from ray_merge.recipe.load import load_recipe

LINEAR = """
merge_method: linear
models:
  - model: A
    parameters: {weight: 0.5}
  - model: B
    parameters: {weight: 0.5}
dtype: float32
"""
SHARD = 60_000  # the small models make about 16 shards of this size


def _recipe(tmp_path, a, b) -> str:
    return write_recipe(tmp_path / "r.yml", LINEAR, A=a, B=b)


def _one_line_error(res_or_rc, err: str, *fragments) -> str:
    rc = res_or_rc if isinstance(res_or_rc, int) else res_or_rc.returncode
    assert rc == 2, (rc, err)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def _no_output(out) -> None:
    assert not os.path.lexists(out)
    assert not os.path.lexists(f"{out}.ray-merge-partial")


def _copy_model(models_dir, tmp_path, src="llama_ft1", name="bad"):
    dst = tmp_path / name
    shutil.copytree(models_dir / src, dst)
    return dst


def _edit_header(path, edit) -> None:
    """Rewrite a safetensors file's header with ``edit(header)``, keeping its data bytes."""
    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + raw[8 + n:])


Q = "model.layers.0.self_attn.q_proj.weight"
O = "model.layers.0.self_attn.o_proj.weight"


def _shape_too_big(h):
    h[Q]["shape"] = [128, 64]  # needs twice the bytes its offsets span: would read the next tensor's


def _overlap(h):
    h[O]["data_offsets"] = h[Q]["data_offsets"]  # two tensors aliasing the same bytes


def _unknown_dtype(h):
    h[Q]["dtype"] = "F7"


def _unclaimed_data(h):
    h.pop(O)  # its bytes are still in the file, claimed by nobody


def _trailing_data(h):
    last = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])
    h.pop(last)  # the file holds more data than the header accounts for


@pytest.mark.parametrize("edit, fragments", [
    (_shape_too_big, [Q, "needs 16384 bytes", "span 8192"]),
    (_overlap, [Q, O, "overlap those of tensor"]),
    (_unknown_dtype, [Q, "unknown dtype 'F7'"]),
    (_unclaimed_data, ["8192 bytes before them unclaimed"]),
    (_trailing_data, ["the tensors' data ends at byte"]),
])
def test_malformed_safetensors_header(tmp_path, models_dir, edit, fragments):
    bad = _copy_model(models_dir, tmp_path)
    _edit_header(bad / "model.safetensors", edit)
    out = tmp_path / "out"
    res = run_cli("run", _recipe(tmp_path, models_dir / "llama_ft0", bad), out)
    _one_line_error(res, res.stderr, f"{bad}/model.safetensors", "corrupt safetensors header", *fragments)
    _no_output(out)


@pytest.mark.parametrize("entry", ["../../../../../../../../etc/passwd", "ABSOLUTE"])
def test_weight_map_entry_outside_the_model(tmp_path, models_dir, entry):
    bad = _copy_model(models_dir, tmp_path)
    os.rename(bad / "model.safetensors", bad / "model-00001-of-00001.safetensors")
    names = sorted(load_file(bad / "model-00001-of-00001.safetensors"))
    weight_map = {n: "model-00001-of-00001.safetensors" for n in names}
    entry = str(models_dir / "llama_ft0" / "model.safetensors") if entry == "ABSOLUTE" else entry
    weight_map[names[0]] = entry
    (bad / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = tmp_path / "out"
    res = run_cli("run", _recipe(tmp_path, models_dir / "llama_ft0", bad), out)
    _one_line_error(res, res.stderr, f"{bad}/model.safetensors.index.json", f"weight_map['{names[0]}']", entry,
                    "not the name of a file in the model directory")
    _no_output(out)


def _with_tensor(models_dir, tmp_path, src, name, tensor_name, value):
    d = _copy_model(models_dir, tmp_path, src, name)
    sd = load_file(d / "model.safetensors")
    sd[tensor_name] = value
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return d


DOWN = "model.layers.0.mlp.down_proj.weight"


@pytest.mark.parametrize("both", [True, False])
def test_integer_weights_are_refused(tmp_path, models_dir, both):
    shape = load_file(models_dir / "llama_ft0" / "model.safetensors")[DOWN].shape
    g = torch.Generator().manual_seed(0)
    quantized = lambda: torch.randint(-100, 100, shape, dtype=torch.int8, generator=g)
    b = _with_tensor(models_dir, tmp_path, "llama_ft1", "b", DOWN, quantized())
    a = _with_tensor(models_dir, tmp_path, "llama_ft0", "a", DOWN, quantized()) if both else models_dir / "llama_ft0"
    out = tmp_path / "out"
    res = run_cli("run", _recipe(tmp_path, a, b), out)
    _one_line_error(res, res.stderr, DOWN, "int8", "cannot be merged",
                    "differs between the models" if both else "mixes integer and floating-point")
    _no_output(out)


def test_identical_integer_buffer_is_copied(tmp_path, models_dir):
    ids = torch.arange(256).unsqueeze(0)
    a = _with_tensor(models_dir, tmp_path, "llama_ft0", "a", "model.position_ids", ids)
    b = _with_tensor(models_dir, tmp_path, "llama_ft1", "b", "model.position_ids", ids)
    out = tmp_path / "out"
    res = run_cli("run", _recipe(tmp_path, a, b), out, "--quiet")
    assert res.returncode == 0, res.stderr
    assert torch.equal(load_file(out / "model-00001-of-00001.safetensors")["model.position_ids"], ids)


class _Stop(Exception):
    pass


def _interrupted(tmp_path, a, b, after=2):
    """Run a merge in process and stop it after ``after`` shards are journaled; return the output path."""

    def executor(plan, shards, stage, options, on_shard, progress=None):
        seen = []

        def then_stop(res):
            on_shard(res)
            seen.append(res)
            if len(seen) == after:
                raise _Stop
        return run_in_process(plan, shards, stage, options, then_stop, progress)

    out = tmp_path / "out"
    with pytest.raises(_Stop):
        run_merge(load_recipe(_recipe(tmp_path, a, b)), str(out), MergeOptions(out_shard_bytes=SHARD, quiet=True),
                  executor=executor)
    assert not out.exists()
    return out


def _files(d) -> dict:
    return {f: (d / f).read_bytes() for f in sorted(os.listdir(d)) if not os.path.isdir(d / f)}


def _shards(d) -> dict:
    return {f: v for f, v in _files(d).items() if f.endswith(".safetensors")}


def test_resume_redoes_a_corrupted_shard(tmp_path, models_dir, capsys):
    a, b = models_dir / "llama_ft0", models_dir / "llama_ft1"
    out = _interrupted(tmp_path, a, b)
    stage = tmp_path / "out.ray-merge-partial"
    first = min(_shards(stage))
    size = (stage / first).stat().st_size
    with open(stage / first, "r+b") as f:  # same size, 1 KiB overwritten
        f.seek(size // 2)
        f.write(b"\xff" * 1024)
    assert cli.main(["run", _recipe(tmp_path, a, b), str(out), "--out-shard-size", str(SHARD), "--resume",
                     "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"{first} does not match the checksum in the journal; redoing it" in err
    ref = tmp_path / "ref"
    res = run_cli("run", _recipe(tmp_path, a, b), ref, "--out-shard-size", str(SHARD), "--quiet")
    assert res.returncode == 0, res.stderr
    assert _shards(out) == _shards(ref)


def test_resume_refuses_a_changed_input(tmp_path, models_dir, capsys):
    a, b = models_dir / "llama_ft0", _copy_model(models_dir, tmp_path, "llama_ft1", "b")
    out = _interrupted(tmp_path, a, b)
    stage = tmp_path / "out.ray-merge-partial"
    before = _files(stage)
    sd = load_file(b / "model.safetensors")
    save_file({k: v + 1 for k, v in sd.items()}, b / "model.safetensors", metadata={"format": "pt"})
    rc = cli.main(["run", _recipe(tmp_path, a, b), str(out), "--out-shard-size", str(SHARD), "--resume", "--quiet"])
    _one_line_error(rc, capsys.readouterr().err, f"{b}/model.safetensors", "input changed", str(stage))
    assert not out.exists()
    assert _files(stage) == before  # kept as it was


def test_second_run_is_locked_out(tmp_path, models_dir):
    r = _recipe(tmp_path, models_dir / "llama_ft0", models_dir / "llama_ft1")
    out = tmp_path / "out"
    second = []

    def executor(plan, shards, stage, options, on_shard, progress=None):
        # what the advice says to do while the first run is still alive
        second.append(run_cli("run", r, out, "--resume", "--out-shard-size", str(SHARD)))
        return run_in_process(plan, shards, stage, options, on_shard, progress)

    run_merge(load_recipe(r), str(out), MergeOptions(out_shard_bytes=SHARD, quiet=True), executor=executor)
    res = second[0]
    _one_line_error(res, res.stderr, "another ray-merge run", f"pid {os.getpid()}", "out.ray-merge-partial")
    assert (out / "ray_merge_manifest.json").exists()  # the first run finished undisturbed
    assert not (out / staging.LOCK).exists() and not os.path.exists(f"{out}.ray-merge-partial")


@pytest.mark.parametrize("target", ["empty_dir", "dangling", "loop"])
def test_symlinked_output_is_refused_before_work(tmp_path, models_dir, target, monkeypatch, capsys):
    out = tmp_path / "out"
    real = tmp_path / "real"
    if target == "empty_dir":
        real.mkdir()
    os.symlink(out if target == "loop" else real, out)

    def no_reads(*a, **k):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(stream, "compute_tensor", no_reads)
    rc = cli.main(["run", _recipe(tmp_path, models_dir / "llama_ft0", models_dir / "llama_ft1"), str(out), "--quiet"])
    _one_line_error(rc, capsys.readouterr().err, f"output {out} is a symbolic link")
    assert os.path.islink(out) and not os.path.lexists(f"{out}.ray-merge-partial")
    if target == "empty_dir":
        assert os.listdir(real) == []


def test_full_disk_before_work_leaves_nothing(tmp_path, models_dir, monkeypatch, capsys):
    Usage = collections.namedtuple("Usage", "total used free")
    monkeypatch.setattr(staging.shutil, "disk_usage", lambda p: Usage(10**9, 10**9, 1000))
    out = tmp_path / "out"
    rc = cli.main(["run", _recipe(tmp_path, models_dir / "llama_ft0", models_dir / "llama_ft1"), str(out), "--quiet"])
    _one_line_error(rc, capsys.readouterr().err, "not enough disk space")
    _no_output(out)


def test_full_disk_while_writing_names_the_file(tmp_path, models_dir, monkeypatch, capsys):
    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(writer, "open", lambda *a, **k: FullDisk(open(*a, **k)), raising=False)  # noqa: SIM115
    out = tmp_path / "out"
    rc = cli.main(["run", _recipe(tmp_path, models_dir / "llama_ft0", models_dir / "llama_ft1"), str(out), "--quiet"])
    _one_line_error(rc, capsys.readouterr().err, f"{out}.ray-merge-partial/model-00001-of-00001.safetensors.tmp",
                    "No space left on device")
    _no_output(out)  # no shard finished: nothing to resume, nothing left behind


def test_failed_check_without_finished_shards_leaves_nothing(tmp_path, models_dir, monkeypatch, capsys):
    def failing_check(pt, *a, **k):
        raise UserError(f"tensor {pt.name}: a method's check failed")

    monkeypatch.setattr(stream, "compute_tensor", failing_check)
    r = _recipe(tmp_path, models_dir / "llama_ft0", models_dir / "llama_ft1")
    out = tmp_path / "out"
    rc = cli.main(["run", r, str(out), "--quiet"])
    _one_line_error(rc, capsys.readouterr().err, "a method's check failed")
    _no_output(out)
    monkeypatch.undo()
    assert cli.main(["run", r, str(out), "--quiet"]) == 0  # the next run is not blocked
    assert (out / "ray_merge_manifest.json").exists()


def test_failed_run_keeps_finished_shards_and_foreign_files(tmp_path, models_dir, monkeypatch):
    """A partial directory holding finished shards is what --resume is for; a file ray-merge did not write
    is never deleted."""
    a, b = models_dir / "llama_ft0", models_dir / "llama_ft1"
    recipe = load_recipe(_recipe(tmp_path, a, b))
    real = stream.compute_tensor

    # a fresh run fails with a file of someone else's in its staging directory: that file stays
    fresh = tmp_path / "fresh"
    fresh_stage = tmp_path / "fresh.ray-merge-partial"

    def fail_beside_a_foreign_file(pt, *args, **kw):
        (fresh_stage / "notes.txt").write_text("mine")
        raise UserError("a method's check failed")

    monkeypatch.setattr(stream, "compute_tensor", fail_beside_a_foreign_file)
    with pytest.raises(UserError):
        run_merge(recipe, str(fresh), MergeOptions(quiet=True))
    assert os.listdir(fresh_stage) == ["notes.txt"] and not fresh.exists()

    # a resumed run fails before finishing anything new: the shards finished before are kept
    monkeypatch.setattr(stream, "compute_tensor", real)
    out = _interrupted(tmp_path, a, b)
    stage = tmp_path / "out.ray-merge-partial"
    finished = _shards(stage)
    assert len(finished) == 2

    def fail(pt, *args, **kw):
        raise UserError("a method's check failed")

    monkeypatch.setattr(stream, "compute_tensor", fail)
    options = MergeOptions(out_shard_bytes=SHARD, quiet=True, resume=True)
    with pytest.raises(UserError):
        run_merge(recipe, str(out), options)
    assert _shards(stage) == finished and not out.exists()
    monkeypatch.setattr(stream, "compute_tensor", real)
    run_merge(recipe, str(out), options)
    assert (out / "ray_merge_manifest.json").exists()


def test_nan_in_an_input_is_warned_about_and_counted(tmp_path):
    """NaN/inf in an input pass into the merge (as in mergekit), but never silently: a warning names the tensor
    and the input holding them, and the manifest counts them per tensor."""
    import json

    from safetensors.torch import load_file, save_file

    from models import build_model, save_model

    a = save_model(build_model("llama", seed=3), str(tmp_path / "a"))
    b = save_model(build_model("llama", seed=4), str(tmp_path / "b"))
    weights = os.path.join(b, "model.safetensors")
    sd = load_file(weights)
    name = "model.layers.1.mlp.up_proj.weight"
    sd[name][0, :3] = float("nan")
    sd[name][1, 0] = float("inf")
    save_file(sd, weights, metadata={"format": "pt"})
    recipe = write_recipe(tmp_path / "r.yml", f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: "
                          f"{{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\ndtype: float32\n")
    proc = run_cli("run", recipe, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [line for line in proc.stderr.splitlines() if "NaN/inf" in line]
    assert len(warnings) == 1 and name in warnings[0] and b in warnings[0] and "(4)" in warnings[0], proc.stderr
    manifest = json.load(open(tmp_path / "out" / "ray_merge_manifest.json"))
    assert manifest["non_finite_values"] == {name: 4}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64,
                                   torch.float8_e4m3fn, torch.float8_e5m2])
def test_non_finite_count_is_exact_wherever_the_values_are(dtype):
    """The fast screen (min/max) finds a single NaN or inf anywhere; the count equals an independent count."""
    from ray_merge.execute.shards import count_non_finite

    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        n = int(torch.randint(1, 200_000, (1,), generator=g))
        t = torch.randn(n, generator=g) * 100
        for j, i in enumerate(torch.randint(0, n, (trial % 4,), generator=g).tolist()):
            t[i] = (float("nan"), float("inf"), -float("inf"))[j % 3]
        t = t.to(dtype)
        expected = int((~torch.isfinite(t.to(torch.float64))).sum())
        assert count_non_finite(t) == expected
        assert count_non_finite(t.reshape(-1, 1).expand(-1, 2).t()) == 2 * expected  # a strided view
    assert count_non_finite(torch.tensor(float("nan"), dtype=dtype if dtype.itemsize > 1 else torch.float32)) == 1
    assert count_non_finite(torch.arange(5)) == 0


def test_float8_inputs_without_dtype_is_one_line(tmp_path):
    """Plain float8 weights (no scales) cannot be merged in float8: one line asking for a dtype; with one, it runs."""
    from safetensors.torch import load_file, save_file

    from models import build_model, save_model

    paths = []
    for i in range(2):
        p = save_model(build_model("llama", seed=i), str(tmp_path / f"m{i}"))
        weights = os.path.join(p, "model.safetensors")
        save_file({k: v.to(torch.float8_e4m3fn) for k, v in load_file(weights).items()}, weights,
                  metadata={"format": "pt"})
        paths.append(p)
    recipe = write_recipe(tmp_path / "r.yml", f"merge_method: linear\nmodels:\n  - model: {paths[0]}\n    parameters: "
                          f"{{weight: 0.5}}\n  - model: {paths[1]}\n    parameters: {{weight: 0.5}}\n")
    proc = run_cli("run", recipe, tmp_path / "out")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "float8_e4m3fn" in lines[-1] and "dtype" in lines[-1] and str(recipe) in lines[-1]
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(f"{tmp_path / 'out'}.ray-merge-partial")
    proc = run_cli("run", recipe, tmp_path / "out", "--set", "dtype=bfloat16")
    assert proc.returncode == 0, proc.stderr[-2000:]
