"""ray-merge against mergekit, tensor by tensor, on every recipe in tests/recipes/.

The models come from tests/conformance/make_fixtures.py (run with the mergekit side venv's python), each recipe
goes through `mergekit-yaml` (the side venv that .ci/run installs, or $MERGEKIT_VENV) and `ray-merge run`, and
tests/conformance/compare.py decides whether the outputs match (its docstring says how). One test per recipe;
a failing tool's own output is in the failure message.
"""
import glob
import importlib.util
import os
import re
import subprocess

import pytest
from conftest import REPO, mergekit_venv

HERE = os.path.join(REPO, "tests", "conformance")
RECIPES = sorted(glob.glob(os.path.join(REPO, "tests", "recipes", "*.yml")))


def _compare_module():
    spec = importlib.util.spec_from_file_location("conformance_compare", os.path.join(HERE, "compare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compare = _compare_module()


@pytest.fixture(scope="module")
def conformance_fixtures(tmp_path_factory):
    python = os.path.join(mergekit_venv(), "bin", "python")
    out = tmp_path_factory.mktemp("conformance") / "fixtures"
    res = subprocess.run([python, os.path.join(HERE, "make_fixtures.py"), str(out)], capture_output=True,
                         text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=600)
    if res.returncode != 0:
        pytest.fail(f"building the conformance models failed (exit {res.returncode}) with {python}:\n"
                    f"{(res.stdout + res.stderr)[-4000:]}", pytrace=False)
    return out


def test_every_recipe_uses_known_fixtures():
    """Collected even without the oracle: each recipe parses and names only models that make_fixtures builds."""
    import yaml

    assert len(RECIPES) >= 30
    with open(os.path.join(HERE, "make_fixtures.py")) as f:
        builder = f.read()
    for path in RECIPES:
        with open(path) as f:
            text = f.read()
        recipe = yaml.safe_load(text)
        assert "merge_method" in recipe, path
        for model in re.findall(r"FIX/(\w+)", text):
            family = model.rsplit("_", 1)[0]
            assert f'"{family}"' in builder, f"{os.path.basename(path)}: FIX/{model} is not built by make_fixtures.py"


@pytest.fixture(scope="module")
def conformance_results(conformance_fixtures, tmp_path_factory):
    """{recipe name: problems}: each tool runs every recipe in one process (compare.check_batch), so the whole
    set costs one start-up of each tool instead of one per recipe."""
    python = os.path.join(mergekit_venv(), "bin", "python")
    return compare.check_batch(RECIPES, str(conformance_fixtures), str(tmp_path_factory.mktemp("work")), python)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: os.path.splitext(os.path.basename(p))[0])
def test_matches_mergekit(conformance_results, recipe):
    name = os.path.splitext(os.path.basename(recipe))[0]
    problems = conformance_results[name]
    assert not problems, f"{name}: {len(problems)} problems\n" + "\n".join(problems[:20])
