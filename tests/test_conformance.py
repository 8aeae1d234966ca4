"""ray-merge against mergekit, tensor by tensor, with ../shared/conformance's harness.

Runs the shared cases and this repo's extra recipes (tests/recipes/: other architectures, slices, gradients,
filters) through mergekit (side venv) and `ray-merge run`, and requires every case to match.
"""
import glob
import os
import subprocess
import sys

import pytest

from conftest import REPO, SHARED, mergekit_venv

HARNESS = os.path.join(SHARED, "conformance")


@pytest.fixture(scope="module")
def conformance_fixtures(tmp_path_factory):
    venv = mergekit_venv()
    out = tmp_path_factory.mktemp("conf") / "fixtures"
    subprocess.run([f"{venv}/bin/python", os.path.join(HARNESS, "make_fixtures.py"), str(out)], check=True,
                   capture_output=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("which", ["shared", "repo"])
def test_matches_mergekit(conformance_fixtures, tmp_path, which):
    venv = mergekit_venv()
    if which == "shared":
        cases = sorted(glob.glob(os.path.join(HARNESS, "cases", "*.yml")))
    else:
        cases = sorted(glob.glob(os.path.join(REPO, "tests", "recipes", "*.yml")))
    assert cases
    ours = f"{sys.executable} -m ray_merge.cli run {{config}} {{out}} --random-seed 0 --quiet"
    res = subprocess.run(
        [f"{venv}/bin/python", os.path.join(HARNESS, "run.py"), "--fixtures", str(conformance_fixtures),
         "--work", str(tmp_path / "work"), "--mergekit", f"{venv}/bin/mergekit-yaml {{config}} {{out}} --random-seed 0",
         "--ours", ours, *cases],
        capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=900,
    )
    print(res.stdout)
    last = res.stdout.strip().splitlines()[-1]
    assert last == f"conformance: {len(cases)}/{len(cases)} cases match mergekit", res.stdout + res.stderr[-2000:]
