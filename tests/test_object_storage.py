"""Output on object storage: merges to s3:// (moto's S3 server on 127.0.0.1) in process and on two Ray workers
give the bytes of a local merge; an interrupted merge resumes from the journal on S3; store errors are one
line. Hub models: a worker downloads only the weight files of the shards it merges."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pytest
from conftest import local_ray, write_recipe
from test_hub_plan import TIES, Hub, repos  # noqa: F401  (repos: the hub repositories fixture, reused)

from ray_merge.cli import main as cli_main
from ray_merge.engine import make_plan, run_merge
from ray_merge.errors import UserError
from ray_merge.execute.local import run_in_process
from ray_merge.options import MergeOptions, WorkerSpec
from ray_merge.output.staging import MANIFEST
from ray_merge.recipe.load import load_recipe

pytestmark = pytest.mark.timeout(300)

SHARD = 60_000  # several output shards for the small llama

LINEAR = """
merge_method: linear
models:
  - model: M/llama_ft0
    parameters: {weight: 0.5}
  - model: M/llama_ft1
    parameters: {weight: 0.5}
dtype: float32
out_dtype: bfloat16
"""

AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
           "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free port, the AWS_* variables pointing at it (set before Ray starts, so its
    workers have them too) and an empty bucket; yields (endpoint, s3fs filesystem)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in AWS_ENV}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_ENDPOINT_URL=endpoint,
                      AWS_DEFAULT_REGION="us-east-1", AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
                      AWS_CONFIG_FILE="/nonexistent")
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("bkt")
    try:
        yield endpoint, fs
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def ref(models_dir, tmp_path_factory):
    """The recipe and its merge to a local directory, which every S3 output is compared with."""
    d = tmp_path_factory.mktemp("ref")
    recipe = write_recipe(d / "r.yml", LINEAR, **{"M/": f"{models_dir}/"})
    merge(recipe, str(d / "out"))
    return recipe, d / "out"


def merge(recipe, out, executor=None, *, resume=False, storage_options=None):
    options = MergeOptions(out_shard_bytes=SHARD, quiet=True, resume=resume, storage_options=storage_options)
    return run_merge(load_recipe(str(recipe)), out, options, executor=executor)


def download(fs, prefix: str, dest) -> dict[str, bytes]:
    fs.invalidate_cache()
    os.makedirs(dest, exist_ok=True)
    fs.get(f"{prefix}/", f"{dest}/", recursive=True)
    return read_files(dest)


def read_files(d) -> dict[str, bytes]:
    out = {}
    for base, _, files in os.walk(d):
        for f in files:
            with open(os.path.join(base, f), "rb") as fh:
                out[os.path.relpath(os.path.join(base, f), d)] = fh.read()
    return out


def assert_same(got: dict[str, bytes], want: dict[str, bytes], *, manifest: bool = True):
    assert sorted(got) == sorted(want)
    assert sum(f.endswith(".safetensors") for f in want) > 2
    for name in want:
        if name != MANIFEST or manifest:
            assert got[name] == want[name], f"{name} differs"


def test_in_process_merge_to_s3_same_bytes_and_loads(s3, ref, tmp_path):
    _, fs = s3
    recipe, local = ref
    merge(recipe, "s3://bkt/inproc")
    got = download(fs, "bkt/inproc", tmp_path / "dl")
    assert_same(got, read_files(local))
    assert not fs.exists("bkt/inproc.ray-merge-partial")  # the bookkeeping is gone

    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "dl"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    # a second run into the same prefix is refused: the output is not empty
    with pytest.raises(UserError, match="not empty"):
        merge(recipe, "s3://bkt/inproc")


@pytest.fixture(scope="module")
def ray_local(s3):
    """One local Ray instance for the Ray cases (started after the AWS_* variables are set)."""
    with local_ray("rmo") as ray:
        yield ray


def test_two_ray_workers_write_to_s3_same_bytes(s3, ref, ray_local, tmp_path):
    from ray_merge.execute.ray.driver import RayExecutor

    _, fs = s3
    recipe, local = ref
    ex = RayExecutor(WorkerSpec(workers=2))
    merge(recipe, "s3://bkt/ray", ex)
    assert_same(download(fs, "bkt/ray", tmp_path / "dl"), read_files(local), manifest=False)
    manifest = json.loads((tmp_path / "dl" / MANIFEST).read_text())
    assert sorted(len(w["shards"]) > 0 for w in manifest["workers"]) == [True, True]  # both workers wrote
    assert not fs.exists("bkt/ray.ray-merge-partial")


def test_interrupted_merge_resumes_from_s3(s3, ref, tmp_path, monkeypatch):
    from ray_merge.execute import stream

    _, fs = s3
    recipe, local = ref
    real = stream.compute_tensor
    calls = {"n": 0}

    def flaky(pt, inputs, seed, device="cpu"):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real(pt, inputs, seed, device)

    monkeypatch.setattr(stream, "compute_tensor", flaky)
    with pytest.raises(KeyboardInterrupt):
        merge(recipe, "s3://bkt/resume")
    monkeypatch.setattr(stream, "compute_tensor", real)
    fs.invalidate_cache()
    journaled = {json.loads(fs.cat_file(p))["index"] for p in fs.ls("bkt/resume.ray-merge-partial/journal")}
    assert journaled
    names = {os.path.basename(p) for p in fs.ls("bkt/resume")}
    # shards, but no index or config: nothing would load this as a model
    assert names and all(n.endswith(".safetensors") for n in names)

    with pytest.raises(UserError, match="--resume"):
        merge(recipe, "s3://bkt/resume")

    done = []

    def recording(plan, shards, stage, options, on_shard, progress=None):
        done.extend(s.index for s in shards)
        return run_in_process(plan, shards, stage, options, on_shard, progress)

    merge(recipe, "s3://bkt/resume", recording, resume=True)
    plan = make_plan(load_recipe(str(recipe)), MergeOptions(out_shard_bytes=SHARD))
    assert done and not set(done) & journaled
    assert sorted(done + sorted(journaled)) == [s.index for s in plan.shards]
    # (the manifest's shard records of a resumed run carry their journal times, as for a local output)
    assert_same(download(fs, "bkt/resume", tmp_path / "dl"), read_files(local), manifest=False)
    assert not fs.exists("bkt/resume.ray-merge-partial")


def _cli_error(capsys, *argv) -> str:
    capsys.readouterr()
    assert cli_main(["run", *map(str, argv), "--quiet"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_store_errors_are_one_line(s3, ref, capsys):
    recipe, _ = ref
    line = _cli_error(capsys, recipe, "s3://no-such-bucket/out")
    assert "s3://no-such-bucket/out" in line and "bucket" in line
    # (retries off: the same error, sooner)
    unreachable = {"endpoint_url": "http://127.0.0.1:9", "config_kwargs": {"retries": {"max_attempts": 1}}}
    line = _cli_error(capsys, recipe, "s3://bkt/x", "--storage-options", json.dumps(unreachable))
    assert "s3://bkt/x" in line and "endpoint" in line
    line = _cli_error(capsys, recipe, "s3://bkt/x", "--storage-options", "{not json")
    assert "--storage-options" in line
    line = _cli_error(capsys, recipe, "s3://bkt")
    assert "prefix inside the bucket" in line


def test_lock_on_s3_names_its_holder(s3, ref):
    """A live run's lock object refuses a second run, even with --resume; a stale one is taken over."""
    _, fs = s3
    recipe, _ = ref
    fs.pipe_file("bkt/locked.ray-merge-partial/plan_fingerprint", b"x")
    fs.pipe_file("bkt/locked.ray-merge-partial/.ray-merge.lock",
                 json.dumps({"host": "elsewhere", "pid": 1, "token": "t", "time": time.time()}).encode())
    with pytest.raises(UserError, match="pid 1 on host elsewhere"):
        merge(recipe, "s3://bkt/locked", resume=True)
    fs.pipe_file("bkt/locked.ray-merge-partial/.ray-merge.lock",
                 json.dumps({"host": "elsewhere", "pid": 1, "token": "t", "time": 0}).encode())
    with pytest.raises(UserError, match="different recipe"):  # stale: taken, then the fingerprint checked
        merge(recipe, "s3://bkt/locked", resume=True)


# ----------------------------------------------------------------------------------------------
# Hub models: each worker downloads the weight files it reads, one by one
# ----------------------------------------------------------------------------------------------

HUB_SCRIPT = r"""
import json, os, sys
from ray_merge.engine import make_plan, run_merge
from ray_merge.execute.local import run_in_process
from ray_merge.execute.shards import write_shards
from ray_merge.options import MergeOptions
from ray_merge.recipe.load import load_recipe

recipe_path, out, merged = sys.argv[1:4]
options = MergeOptions(out_shard_bytes=20_000, quiet=True)
plan = make_plan(load_recipe(recipe_path), options)
a = next(k for k, m in enumerate(plan.models) if m.ref == "org/a")
snap = plan.models[a].path

def weights():
    return sorted(f for f in os.listdir(snap) if f.endswith(".safetensors"))

# a shard whose inputs of org/a all lie in one file, while the plan reads other files of org/a too
files_of = {s.index: {os.path.basename(i.file) for t in plan.shard_tensors(s) for i in t.inputs if i.model == a}
            for s in plan.shards}
every = set().union(*files_of.values())
shard = next(s for s in plan.shards if len(files_of[s.index]) == 1)
before = weights()
os.makedirs(out)
write_shards(plan, [shard], out)
report = {"every": sorted(every), "before": before, "read": sorted(files_of[shard.index]), "after": weights()}

def executor(plan, shards, stage, options, on_shard, progress=None):
    report["at_dispatch"] = weights()  # what the driver fetched before handing out the work: nothing
    return run_in_process(plan, shards, stage, options, on_shard, progress)

for f in report["after"]:
    os.remove(os.path.realpath(os.path.join(snap, f)))
    os.remove(os.path.join(snap, f))
run_merge(load_recipe(recipe_path), merged, options, executor=executor)
print(json.dumps(report))
"""


def test_hub_model_fetched_file_by_file(repos, tmp_path):  # noqa: F811 (the imported fixture)
    with Hub(repos) as hub:
        recipe = write_recipe(tmp_path / "hub.yml", TIES, A="org/a", B="org/b")
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"),
                   HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1",
                   HF_HUB_ETAG_TIMEOUT="10", HF_HUB_DOWNLOAD_TIMEOUT="10", NO_PROXY="127.0.0.1,localhost",
                   no_proxy="127.0.0.1,localhost")
        res = subprocess.run([sys.executable, "-c", HUB_SCRIPT, recipe, str(tmp_path / "one"), str(tmp_path / "all")],
                             capture_output=True, text=True, env=env, timeout=240)
        assert res.returncode == 0, res.stderr
        report = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(report["every"]) > 1 and report["before"] == []
    assert report["after"] == report["read"]  # only the file that shard reads was downloaded
    assert report["at_dispatch"] == []
    assert os.path.exists(tmp_path / "all" / "model.safetensors.index.json")
