"""Shared fixtures: small local models (nothing is downloaded) and the mergekit oracle."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def local_ray(prefix: str):
    """A local Ray instance for a test module, in a short temp dir under /tmp (Ray's socket paths are limited);
    shut down and removed afterwards."""
    import ray

    tmp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, _temp_dir=tmp, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def mergekit_venv() -> str:
    """The side venv holding the reference mergekit (its pins must not touch ours)."""
    venv = os.environ.get("MERGEKIT_VENV") or os.path.join(REPO, ".venv-mergekit")
    if not os.path.exists(os.path.join(venv, "bin", "mergekit-yaml")):
        pytest.fail(f"mergekit oracle not installed at {venv} (.ci/run creates it; or set MERGEKIT_VENV)")
    return venv


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    """llama / mistral / qwen2 / gpt2 families: a base and three perturbed fine-tunes each."""
    from models import make_family

    root = tmp_path_factory.mktemp("models")
    for kind in ("llama", "mistral", "qwen2", "gpt2"):
        make_family(str(root), kind, n_finetunes=3, seed=1, hidden=64, layers=4, intermediate=128)
    return root


def run_cli(*args, env=None, cwd=None, timeout=300):
    """Run `ray-merge ARGS` in a subprocess; return the CompletedProcess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "ray_merge.cli", *map(str, args)], capture_output=True,
                          text=True, env=full_env, cwd=cwd, timeout=timeout)


def write_recipe(path, text: str, **subst) -> str:
    for k, v in subst.items():
        text = text.replace(k, str(v))
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def load_dir(path) -> dict:
    import glob

    from safetensors import safe_open

    out = {}
    for f in sorted(glob.glob(os.path.join(str(path), "*.safetensors"))):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out
