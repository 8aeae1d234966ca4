"""`ray-merge submit / status / logs` and `ray job submit -- ray-merge run` against a real
one-machine Ray cluster (`ray start --head` on 127.0.0.1, token authentication on)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid

import pytest
import yaml
from conftest import run_cli, write_recipe

from ray_merge.output.staging import MANIFEST

SHARD = 30_000

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


def read_files(d) -> dict[str, bytes]:
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d)) if f != MANIFEST}


# --------------------------------------------------------------------------------------------
# Without a cluster
# --------------------------------------------------------------------------------------------

def test_shipped_recipe_has_absolute_model_paths(models_dir, tmp_path, monkeypatch):
    from ray_merge.cli.jobs import ship_recipe

    monkeypatch.chdir(models_dir)
    src = write_recipe(tmp_path / "rel.yml", LINEAR + "base_model: llama_base\n", **{"M/": ""})
    dest = tmp_path / "ship"
    dest.mkdir()
    name = ship_recipe(src, [], str(dest))
    data = yaml.safe_load(open(dest / name))
    assert [m["model"] for m in data["models"]] == [str(models_dir / "llama_ft0"), str(models_dir / "llama_ft1")]
    assert data["base_model"] == str(models_dir / "llama_base")
    assert data["models"][0]["parameters"] == {"weight": 0.5}


def test_submit_forwards_run_options():
    from ray_merge.cli import build_parser
    from ray_merge.cli.jobs import forwarded_run_args

    args = build_parser().parse_args([
        "submit", "r.yml", "out", "--address", "http://h:8265", "--workers", "4", "--worker-memory", "16GiB",
        "--out-shard-size", "2B", "--set", "parameters.t=0.3", "--no-copy-tokenizer", "--resume", "-vv",
        "--random-seed", "3", "--worker-resource", "merge=1", "--wait",
    ])
    words = forwarded_run_args(args)
    assert "--address" not in words and "--wait" not in words and "http://h:8265" not in words
    run_args = build_parser().parse_args(["run", "r.yml", "out", *words])
    for key in ("workers", "worker_memory", "out_shard_size", "overrides", "copy_tokenizer", "resume", "verbose",
                "random_seed", "worker_resource"):
        assert getattr(run_args, key) == getattr(args, key), key
    assert run_args.out_shard_size == 2 * 10**9
    # nothing given, nothing forwarded
    assert forwarded_run_args(build_parser().parse_args(["submit", "r.yml", "out"])) == []


# --------------------------------------------------------------------------------------------
# A real head node on 127.0.0.1
# --------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_bin() -> str:
    near = os.path.join(os.path.dirname(sys.executable), "ray")
    return near if os.path.exists(near) else (shutil.which("ray") or "ray")


def _processes_of(sid: int, marker: str):
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getsid(p.pid) == sid or any(marker in a for a in (p.info["cmdline"] or [])):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError, PermissionError):
            pass
    return out


def _stop_wait(procs, timeout=3.0):
    """Wait for terminated processes to go (zombies count as gone: their parent has exited), then kill."""
    import time

    import psutil

    def running(p):
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.time() + timeout
    while time.time() < deadline and any(running(p) for p in procs):
        time.sleep(0.2)
    for p in procs:
        if running(p):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.fixture(scope="module")
def head():
    """`ray start --head` on 127.0.0.1 with its own temp dir and ports; stopped (only it) afterwards."""
    import psutil

    tmp = tempfile.mkdtemp(prefix="rms", dir="/tmp")
    token = uuid.uuid4().hex
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_TMPDIR": tmp,
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    ports = {k: _free_port() for k in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                       "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                       "metrics-export-port", "ray-client-server-port")}
    cmd = [_ray_bin(), "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           "--include-dashboard=true", f"--temp-dir={tmp}", "--num-cpus=2", "--disable-usage-stats",
           *[f"--{k}={v}" for k, v in ports.items()]]
    # its own session: every process it starts can be found (and stopped) by session id
    starter = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = starter.communicate(timeout=180)
        assert starter.returncode == 0, log
        client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
        yield {"url": f"http://127.0.0.1:{ports['dashboard-port']}", "env": client_env, "tmp": tmp}
    finally:
        procs = _processes_of(starter.pid, tmp)
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _stop_wait(procs)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(models_dir, tmp_path_factory):
    from ray_merge.engine import run_merge
    from ray_merge.options import MergeOptions
    from ray_merge.recipe.load import load_recipe

    d = tmp_path_factory.mktemp("submit")
    recipe = write_recipe(d / "linear.yml", LINEAR, **{"M/": f"{models_dir}/"})
    run_merge(load_recipe(recipe), str(d / "ref"), MergeOptions(out_shard_bytes=SHARD, quiet=True))
    return recipe, d / "ref"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_submit_status_logs(head, reference, tmp_path):
    recipe, ref = reference
    out = tmp_path / "merged"
    res = run_cli("submit", recipe, out, "--address", head["url"], "--workers", "2", "--out-shard-size", SHARD,
                  "-v", env=head["env"], timeout=300)
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip().splitlines()[0]
    assert job.startswith("raysubmit_") and "ray-merge status" in res.stderr

    res = run_cli("status", job, "--address", head["url"], "--wait", env=head["env"], timeout=400)
    assert res.returncode == 0, res.stderr
    logs = run_cli("logs", job, "--address", head["url"], env=head["env"]).stdout
    assert "SUCCEEDED" in res.stdout, logs
    assert "ray executor: 2 worker(s) at auto" in logs and "wrote 39 tensors" in logs
    assert read_files(ref) == read_files(out)

    # without the cluster's token: one line naming the problem
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    res = subprocess.run([sys.executable, "-m", "ray_merge.cli", "status", job, "--address", head["url"]],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "token" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("status", "raysubmit_nosuchjob", "--address", head["url"], env=head["env"])
    assert res.returncode == 2 and "no such job" in res.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_plain_ray_job_submit(head, reference, tmp_path):
    recipe, ref = reference
    out = tmp_path / "merged"
    env = {**os.environ, **head["env"]}
    res = subprocess.run([_ray_bin(), "job", "submit", "--address", head["url"], "--no-wait", "--",
                          "ray-merge", "run", recipe, str(out), "--workers", "1", "--out-shard-size", str(SHARD),
                          "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    job = next(w.strip("'") for w in (res.stdout + res.stderr).split() if w.strip("'").startswith("raysubmit_"))
    res = run_cli("status", job, "--address", head["url"], "--wait", env=head["env"], timeout=400)
    assert "SUCCEEDED" in res.stdout, run_cli("logs", job, "--address", head["url"], env=head["env"]).stdout
    assert read_files(ref) == read_files(out)
