"""Compare ray-merge's output with mergekit's on conformance recipes.

Used by tests/test_conformance.py (imported), and by hand as a script:

    python tests/conformance/make_fixtures.py FIXTURES            # any python with torch + transformers
    python tests/conformance/compare.py --fixtures FIXTURES --work WORK \\
        --mergekit ".venv-mergekit/bin/mergekit-yaml {config} {out} --random-seed 0" \\
        --ours ".venv/bin/ray-merge run {config} {out} --random-seed 0 --quiet" [RECIPE.yml ...]

With ``--batch MERGEKIT_PYTHON`` (e.g. ``.venv-mergekit/bin/python``) each tool runs all the recipes in one
process (tests/conformance/batch.py), which saves a start-up of torch per recipe and tool.
Without recipes it runs tests/recipes/*.yml (tests/recipes/mergekit_suite/ holds mergekit's own cases).
``FIX/`` in a recipe stands for the fixtures directory. mergekit's outputs are kept under WORK/mergekit/ and
reused by later runs; ray-merge's are rebuilt each time. One line per recipe, then ``conformance: K/N recipes
match mergekit``; exit status 0 only when all match.

What "match" means:
- every recipe: the same tensor names; for each tensor the same shape; the same ``num_hidden_layers`` /
  ``n_layer``, ``vocab_size`` and ``model_type`` in config.json; with a ``tokenizer`` or ``tokenizer_source``
  in the recipe, the same token -> id map.
- deterministic methods: the same dtypes, and values within rtol 1e-2 / atol 1e-5 except for at most 0.1% of a
  tensor's entries (bf16 rounding, exact ties at a top-k boundary).
- randomised methods (recipes named ``*_stat``: the two tools draw different random masks): per tensor of at
  least 1000 entries, the share of entries that differ from the base within 0.05 of mergekit's, and the mean
  size of those differences (clipped at mergekit's 99th percentile) within 15%; no non-finite values.
- a recipe may also state what its output must show, as mergekit's own tests assert it, in comment lines
  ``# expect: {...}`` (a YAML mapping; see ``check_expectations``). Both tools' outputs must show it. With
  ``fail: true`` both tools must refuse the recipe (exit non-zero) and nothing else is compared. With
  ``token_ids: by_token`` the two tokenizers must hold the same tokens, maybe under other ids (mergekit numbers
  a union's added tokens in hash order), and vocabulary rows are compared token by token.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RECIPES = os.path.join(os.path.dirname(HERE), "recipes")

RTOL, ATOL, MAX_OFF = 1e-2, 1e-5, 1e-3
STAT_MIN_NUMEL, STAT_SHARE_TOL, STAT_SIZE_TOL = 1000, 0.05, 0.15
CONFIG_KEYS = ("num_hidden_layers", "n_layer", "vocab_size", "model_type")


def load_tensors(directory: str) -> dict:
    from safetensors import safe_open

    tensors = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def _names(ref: dict, got: dict) -> list[str]:
    missing, extra = sorted(set(ref) - set(got)), sorted(set(got) - set(ref))
    if not missing and not extra:
        return []
    return [f"tensor names differ: {len(missing)} missing (e.g. {missing[:3]}), {len(extra)} extra "
            f"(e.g. {extra[:3]})"]


def compare_values(ref: dict, got: dict) -> list[str]:
    """Deterministic methods: dtypes equal, values close (see the module docstring)."""
    import torch

    problems = _names(ref, got)
    for name in sorted(set(ref) & set(got)):
        want, have = ref[name], got[name]
        if want.shape != have.shape:
            problems.append(f"{name}: shape {tuple(have.shape)}, mergekit {tuple(want.shape)}")
            continue
        if want.dtype != have.dtype:
            problems.append(f"{name}: dtype {have.dtype}, mergekit {want.dtype}")
        w, h = want.float(), have.float()
        if not torch.isfinite(h).all():
            problems.append(f"{name}: non-finite values")
            continue
        off = (w - h).abs() > ATOL + RTOL * w.abs()
        share = off.float().mean().item()
        if share > MAX_OFF:
            problems.append(f"{name}: {share:.2%} of entries differ (largest difference "
                            f"{(w - h).abs().max().item():.3g})")
    return problems


def compare_statistics(ref: dict, got: dict, base: dict) -> list[str]:
    """Randomised methods: how many entries changed from the base, and by how much (module docstring)."""
    problems = _names(ref, got)
    for name in sorted(set(ref) & set(got)):
        want, have = ref[name].float(), got[name].float()
        if want.shape != have.shape:
            problems.append(f"{name}: shape {tuple(have.shape)}, mergekit {tuple(want.shape)}")
            continue
        if name not in base or want.numel() < STAT_MIN_NUMEL:
            continue
        if not have.isfinite().all():
            problems.append(f"{name}: non-finite values")
            continue
        start = base[name].float()
        d_want, d_have = (want - start).abs(), (have - start).abs()
        share_want = (d_want > 0).float().mean().item()
        share_have = (d_have > 0).float().mean().item()
        if abs(share_want - share_have) > STAT_SHARE_TOL:
            problems.append(f"{name}: {share_have:.3f} of entries changed, mergekit {share_want:.3f}")
        if share_want == 0 or share_have == 0:
            continue
        sample = d_want.flatten()[:: max(1, d_want.numel() // 100_000)]
        clip = sample.quantile(0.99).item()
        size_want = d_want.clamp(max=clip)[d_want > 0].mean().item()
        size_have = d_have.clamp(max=clip)[d_have > 0].mean().item()
        if size_want > 0 and abs(size_have - size_want) / size_want > STAT_SIZE_TOL:
            problems.append(f"{name}: mean change {size_have:.4g}, mergekit {size_want:.4g}")
    return problems


def compare_configs(ref_dir: str, got_dir: str) -> list[str]:
    try:
        with open(os.path.join(ref_dir, "config.json")) as f:
            ref = json.load(f)
        with open(os.path.join(got_dir, "config.json")) as f:
            got = json.load(f)
    except (OSError, ValueError) as e:
        return [f"config.json: {e}"]
    return [f"config.json {key}: {got.get(key)!r}, mergekit {ref[key]!r}"
            for key in CONFIG_KEYS if key in ref and ref[key] != got.get(key)]


def token_ids(tokenizer_json: str) -> dict:
    """token -> id over a tokenizer.json's model vocabulary and its added tokens (where a token is listed in
    the file is not part of what a user sees)."""
    with open(tokenizer_json) as f:
        data = json.load(f)
    vocab = data.get("model", {}).get("vocab")
    ids = dict(vocab) if isinstance(vocab, dict) else {}
    ids.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
    return ids


def compare_tokenizers(ref_dir: str, got_dir: str) -> list[str]:
    ref_file, got_file = os.path.join(ref_dir, "tokenizer.json"), os.path.join(got_dir, "tokenizer.json")
    if not os.path.exists(ref_file):
        return []
    if not os.path.exists(got_file):
        return ["tokenizer.json missing"]
    ref, got = token_ids(ref_file), token_ids(got_file)
    differ = sorted(t for t in set(ref) | set(got) if ref.get(t) != got.get(t))
    return [f"token ids differ for {len(differ)} tokens (e.g. {differ[:3]})"] if differ else []


def align_token_rows(ref_dir: str, got_dir: str, got: dict) -> list[str]:
    """Reorder the vocabulary rows of ray-merge's tensors ``got`` (in place) to mergekit's token ids, when the
    two tokenizers hold the same tokens under other ids (a recipe's ``# expect: {token_ids: by_token}``:
    mergekit numbers the tokens a union adds in Python hash order, which changes from run to run).
    Vocabulary tensors are those with as many rows as config.json's vocab_size."""
    import torch

    ref_ids = token_ids(os.path.join(ref_dir, "tokenizer.json"))
    got_ids = token_ids(os.path.join(got_dir, "tokenizer.json"))
    if set(ref_ids) != set(got_ids):
        only_one = sorted(set(ref_ids) ^ set(got_ids))
        return [f"token sets differ: {len(only_one)} tokens in only one (e.g. {only_one[:3]})"]
    with open(os.path.join(got_dir, "config.json")) as f:
        rows = json.load(f).get("vocab_size")
    order = torch.arange(rows or 0)
    for token, ref_id in ref_ids.items():
        if ref_id < len(order) and got_ids[token] < len(order):
            order[ref_id] = got_ids[token]
    for name, tensor in got.items():
        if rows and tensor.dim() >= 1 and tensor.shape[0] == rows:
            got[name] = tensor[order]
    return []


def compare_outputs(name: str, recipe: dict, ref_dir: str, got_dir: str, by_token: bool = False) -> list[str]:
    """Every problem found between mergekit's output ``ref_dir`` and ray-merge's ``got_dir``; with
    ``by_token``, token ids may differ and rows are compared token by token (``align_token_rows``)."""
    ref, got = load_tensors(ref_dir), load_tensors(got_dir)
    if not ref:
        return [f"mergekit wrote no safetensors in {ref_dir}"]
    if not got:
        return [f"ray-merge wrote no safetensors in {got_dir}"]
    if by_token:
        token_problems = align_token_rows(ref_dir, got_dir, got)
        if token_problems:
            return token_problems
    if name.endswith("_stat"):
        problems = compare_statistics(ref, got, load_tensors(recipe["base_model"]))
    else:
        problems = compare_values(ref, got)
    problems += compare_configs(ref_dir, got_dir)
    if ("tokenizer" in recipe or "tokenizer_source" in recipe) and not by_token:
        problems += compare_tokenizers(ref_dir, got_dir)
    return problems


def read_expectations(recipe_file: str) -> dict:
    """The ``# expect: {...}`` comment lines of a recipe, merged into one mapping."""
    import yaml

    expect = {}
    with open(recipe_file) as f:
        for line in f:
            if line.startswith("# expect:"):
                expect.update(yaml.safe_load(line[len("# expect:"):]) or {})
    return expect


def _chat_template(out_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(out_dir).chat_template


def check_expectations(expect: dict, out_dir: str) -> list[str]:
    """What mergekit's tests assert about an output directory. Keys of ``expect``:
    ``config: {key: value}`` (config.json, dotted keys reach nested configs); ``zero`` / ``nonzero``: name
    fragments whose tensors must be all zero / not all zero (at least one such tensor each); ``shapes:
    {tensor: [..]}``; ``vocab``: the tokenizer's size (token -> id map, added tokens included);
    ``has_tokens`` / ``lacks_tokens``; ``rows: [[tensor, token, model_dir, token or id], ...]``: the output's
    row of ``tensor`` for ``token`` equals that model's row (atol 1e-3, rtol 1e-4); ``chat_template``: a
    string the output's chat template (as transformers loads it) contains."""
    import torch

    problems = []
    tensors = load_tensors(out_dir) if {"zero", "nonzero", "shapes", "rows"} & set(expect) else {}
    if "config" in expect:
        with open(os.path.join(out_dir, "config.json")) as f:
            config = json.load(f)
        for key, want in expect["config"].items():
            node = config
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node != want:
                problems.append(f"config.json {key}: {node!r}, expected {want!r}")
    for fragment in expect.get("zero", []):
        hits = [n for n in tensors if fragment in n]
        if not hits or any(tensors[n].count_nonzero() for n in hits):
            problems.append(f"tensors named *{fragment}*: expected all zero ({len(hits)} found)")
    for fragment in expect.get("nonzero", []):
        hits = [n for n in tensors if fragment in n]
        if not hits or not all(tensors[n].count_nonzero() for n in hits):
            problems.append(f"tensors named *{fragment}*: expected non-zero ({len(hits)} found)")
    for name, shape in expect.get("shapes", {}).items():
        if name not in tensors or list(tensors[name].shape) != list(shape):
            problems.append(f"{name}: shape {list(tensors[name].shape) if name in tensors else None}, "
                            f"expected {shape}")
    if {"vocab", "has_tokens", "lacks_tokens", "rows"} & set(expect):
        ids = token_ids(os.path.join(out_dir, "tokenizer.json"))
        if "vocab" in expect and len(ids) != expect["vocab"]:
            problems.append(f"tokenizer has {len(ids)} tokens, expected {expect['vocab']}")
        problems += [f"token {t!r} missing" for t in expect.get("has_tokens", []) if t not in ids]
        problems += [f"token {t!r} present" for t in expect.get("lacks_tokens", []) if t in ids]
        for tensor, token, model, source in expect.get("rows", []):
            source_id = source if isinstance(source, int) else token_ids(os.path.join(model, "tokenizer.json"))[source]
            want = load_tensors(model)[tensor][source_id].float()
            have = tensors[tensor][ids[token]].float() if token in ids and tensor in tensors else None
            if have is None or not torch.allclose(have, want, atol=1e-3, rtol=1e-4):
                problems.append(f"{tensor} row of {token!r} differs from {os.path.basename(model)}'s row {source!r}")
    if "chat_template" in expect:
        template = _chat_template(out_dir)
        if not template or expect["chat_template"] not in template:
            problems.append(f"chat template {str(template)[:60]!r} lacks {expect['chat_template']!r}")
    return problems


def prepare(recipe_path: str, fixtures: str, work: str) -> tuple[str, str, dict]:
    """Write the recipe with FIX/ resolved into WORK; return (name, written path, parsed recipe)."""
    import yaml

    name = os.path.splitext(os.path.basename(recipe_path))[0]
    with open(recipe_path) as f:
        text = f.read().replace("FIX/", os.path.abspath(fixtures) + "/")
    os.makedirs(work, exist_ok=True)
    path = os.path.join(work, name + ".yml")
    with open(path, "w") as f:
        f.write(text)
    return name, path, yaml.safe_load(text)


def run_command(argv: list[str], log: str, timeout: float = 900) -> tuple[int, float, str]:
    """Run a command, its output going to ``log``; return (exit status, seconds, the log's last lines)."""
    os.makedirs(os.path.dirname(log), exist_ok=True)
    start = time.time()
    with open(log, "w") as out:
        try:
            rc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                                env=dict(os.environ, HF_HUB_OFFLINE="1")).returncode
        except subprocess.TimeoutExpired:
            rc = 124
            out.write(f"\n(killed after {timeout:.0f} s)\n")
        except OSError as e:  # the program itself is missing
            rc = 127
            out.write(f"\ncannot run {argv[0]}: {e}\n")
    with open(log, errors="replace") as f:
        tail = "\n".join(f.read().strip().splitlines()[-25:])
    return rc, time.time() - start, tail


def run_mergekit(command: str, config: str, out: str) -> tuple[int, float, str]:
    """mergekit's output for ``config`` in ``out``; a finished earlier output is reused."""
    if os.path.exists(os.path.join(out, "config.json")):
        return 0, 0.0, ""
    shutil.rmtree(out, ignore_errors=True)
    rc, seconds, tail = run_command(shlex.split(command.format(config=config, out=out)), out + ".log")
    if rc != 0:
        shutil.rmtree(out, ignore_errors=True)  # never reuse a half-written reference
    return rc, seconds, tail


def run_ours(command: str, config: str, out: str) -> tuple[int, float, str]:
    shutil.rmtree(out, ignore_errors=True)
    return run_command(shlex.split(command.format(config=config, out=out)), out + ".log")


def check_recipe(recipe_path: str, fixtures: str, work: str, mergekit: str, ours: str) -> tuple[str, list[str]]:
    """Run one recipe through both tools and compare; return (name, problems). A tool that fails is a
    problem whose text holds the end of that tool's output."""
    name, config, recipe = prepare(recipe_path, fixtures, work)
    expect = read_expectations(config)
    ref_dir, got_dir = os.path.join(work, "mergekit", name), os.path.join(work, "ours", name)
    if expect.get("fail"):
        shutil.rmtree(ref_dir, ignore_errors=True)  # a refusal is never cached
    ref_rc, _, ref_tail = run_mergekit(mergekit, config, ref_dir)
    got_rc, got_tail = 0, ""
    if ref_rc == 0 or expect.get("fail"):
        got_rc, _, got_tail = run_ours(ours, config, got_dir)
    return name, judge(name, recipe, expect, config, (ref_rc, ref_tail), (got_rc, got_tail), ref_dir, got_dir)


def judge(name: str, recipe: dict, expect: dict, config: str, ref_run: tuple, got_run: tuple, ref_dir: str,
          got_dir: str) -> list[str]:
    """The problems of one recipe, given each tool's (exit status, end of its output) and outputs."""
    (ref_rc, ref_tail), (got_rc, got_tail) = ref_run, got_run
    if expect.get("fail"):
        return [f"{tool} accepted {config}, which should fail"
                for tool, rc in (("mergekit", ref_rc), ("ray-merge", got_rc)) if rc == 0]
    if ref_rc != 0:
        return [f"mergekit failed (exit {ref_rc}) on {config}:\n{ref_tail}"]
    if got_rc != 0:
        return [f"ray-merge failed (exit {got_rc}) on {config}:\n{got_tail}"]
    problems = compare_outputs(name, recipe, ref_dir, got_dir, by_token=expect.get("token_ids") == "by_token")
    problems += [f"mergekit's output: {p}" for p in check_expectations(expect, ref_dir)]
    problems += [f"ray-merge's output: {p}" for p in check_expectations(expect, got_dir)]
    return problems


def _batch_result(out: str) -> tuple[int, str]:
    try:
        with open(out + ".rc") as f:
            rc = int(f.read().strip())
    except (OSError, ValueError):
        rc = 127
    try:
        with open(out + ".log", errors="replace") as f:
            tail = "\n".join(f.read().strip().splitlines()[-25:])
    except OSError:
        tail = "(no log)"
    return rc, tail


def check_batch(recipe_paths: list[str], fixtures: str, work: str, mergekit_python: str,
                ours_python: str = sys.executable, timeout: float = 1800) -> dict[str, list[str]]:
    """Like check_recipe for many recipes, but each tool runs all of them in one process (batch.py):
    {name: problems}. mergekit's finished outputs in WORK are reused, as check_recipe does."""
    cases = []
    for path in recipe_paths:
        name, config, recipe = prepare(path, fixtures, work)
        cases.append((name, config, recipe, read_expectations(config),
                      os.path.join(work, "mergekit", name), os.path.join(work, "ours", name)))
    script = os.path.join(HERE, "batch.py")
    ref_todo = [a for name, config, _, expect, ref, _ in cases
                if expect.get("fail") or not os.path.exists(os.path.join(ref, "config.json")) for a in (config, ref)]
    for python, tool, todo in ((mergekit_python, "mergekit", ref_todo),
                               (ours_python, "ray-merge", [a for c in cases for a in (c[1], c[5])])):
        if todo:
            run_command([python, script, tool, *todo], os.path.join(work, f"batch-{tool}.log"), timeout)
    results = {}
    for name, config, recipe, expect, ref, got in cases:
        ref_run = _batch_result(ref) if os.path.exists(ref + ".rc") else (0, "")
        results[name] = judge(name, recipe, expect, config, ref_run, _batch_result(got), ref, got)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fixtures", required=True, help="directory written by make_fixtures.py")
    p.add_argument("--work", required=True, help="where the resolved recipes and both outputs go")
    p.add_argument("--mergekit", default="mergekit-yaml {config} {out} --random-seed 0",
                   help="mergekit command; {config} and {out} are filled in")
    p.add_argument("--ours", default=f"{shlex.quote(sys.executable)} -m ray_merge.cli run {{config}} {{out}} "
                                     "--random-seed 0 --quiet", help="ray-merge command, likewise")
    p.add_argument("--batch", metavar="MERGEKIT_PYTHON", help="run each tool once over all recipes (batch.py), "
                   "mergekit with this python (the side venv's); --mergekit / --ours are then unused")
    p.add_argument("recipes", nargs="*", help="recipe files (default: tests/recipes/*.yml)")
    args = p.parse_args(argv)
    recipes = args.recipes or sorted(glob.glob(os.path.join(RECIPES, "*.yml")))
    matched = 0
    if args.batch:
        batch = check_batch(recipes, args.fixtures, args.work, args.batch)
    for path in recipes:
        if args.batch:
            name = os.path.splitext(os.path.basename(path))[0]
            problems = batch[name]
        else:
            name, problems = check_recipe(path, args.fixtures, args.work, args.mergekit, args.ours)
        if problems:
            first = problems[0].splitlines()
            print(f"{name}: FAIL ({len(problems)} problems) {first[0]}")
            for line in first[1:]:
                print(f"    {line}")
        else:
            matched += 1
            print(f"{name}: ok")
    print(f"conformance: {matched}/{len(recipes)} recipes match mergekit")
    return 0 if recipes and matched == len(recipes) else 1


if __name__ == "__main__":
    sys.exit(main())
