"""The options table: every flag defined once, the same flag and meaning in every command; options that
really reach the code they are for (--trust-remote-code to every tokenizer load of a merge)."""
from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import fields

import pytest
from conftest import write_recipe

from ray_merge import cli
from ray_merge.cli.options import add_options, options_from_args
from ray_merge.errors import UserError
from ray_merge.options import DEFAULT_SHARD_BYTES, CommandFlags, EvolveOptions, MergeOptions, WorkerSpec

COMMANDS = ["run", "plan", "methods", "demo", "submit", "status", "logs", "stop", "extract-lora", "moe", "multi",
            "evolve"]


def _parse(group, argv):
    p = argparse.ArgumentParser()
    add_options(p, group)
    return options_from_args(p.parse_args(argv), group)


def test_every_flagged_option_round_trips_its_defaults():
    for group in (CommandFlags, MergeOptions, WorkerSpec):
        assert _parse(group, []) == group()
    assert _parse(EvolveOptions, ["--storage-path", "s"]) == EvolveOptions(storage_path="s")


def test_flags_parse_into_the_options():
    o = _parse(MergeOptions, ["--cuda", "--out-shard-size", "2B", "--memory-budget", "1GiB", "--random-seed", "3",
                              "--no-copy-tokenizer", "--trust-remote-code", "--resume", "--quiet"])
    assert o == MergeOptions(device="cuda", out_shard_bytes=2 * 10**9, memory_budget=2**30, random_seed=3,
                             copy_tokenizer=False, trust_remote_code=True, resume=True, quiet=True)
    assert _parse(MergeOptions, ["--device", "cuda:1"]).device == "cuda:1"
    assert MergeOptions().out_shard_bytes == DEFAULT_SHARD_BYTES
    w = _parse(WorkerSpec, ["--workers", "2", "--worker-memory", "16GiB", "--worker-resource", "merge=1",
                            "--worker-resource", "big"])
    assert (w.workers, w.memory, w.resources) == (2, 16 * 2**30, {"merge": 1.0, "big": 1.0})
    with pytest.raises(UserError, match="NAME=AMOUNT"):
        _parse(WorkerSpec, ["--worker-resource", "merge=lots"])


def test_each_flag_is_defined_once():
    seen = {}
    for group in (CommandFlags, MergeOptions, WorkerSpec, EvolveOptions):
        for f in fields(group):
            for flag in f.metadata.get("flags", ()):
                assert flag not in seen, f"{flag}: {seen[flag]} and {group.__name__}.{f.name}"
                seen[flag] = f"{group.__name__}.{f.name}"


def _flags(command: str) -> dict[str, argparse.Action]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {o: a for a in sub.choices[command]._actions for o in a.option_strings}


def test_a_shared_flag_means_the_same_in_every_command():
    table = {}
    for group in (CommandFlags, MergeOptions, WorkerSpec, EvolveOptions):
        for f in fields(group):
            for flag in f.metadata.get("flags", ()):
                table[flag] = f
    for command in COMMANDS:
        for flag, action in _flags(command).items():
            if flag in table and command not in ("status", "logs", "stop"):  # their --address: a dashboard URL
                f = table[flag]
                default = f.default_factory() if callable(f.default_factory) else f.default
                assert action.default == default or (action.default == [] and default == {}), (command, flag)


def test_mergekit_flags_are_accepted_with_a_note(tmp_path, capsys):
    argv = ["run", str(tmp_path / "missing.yml"), str(tmp_path / "out"), "--lazy-unpickle", "--low-cpu-memory"]
    assert cli.main(argv) == 2  # the recipe is missing: after the notes
    err = capsys.readouterr().err
    assert "note: --lazy-unpickle has no effect" in err and "note: --low-cpu-memory has no effect" in err


def test_help_does_not_import_torch_or_ray():
    code = ("import sys; from ray_merge import cli; cli.build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_missing_cuda_device_is_one_line(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv in (["run", "r.yml", str(tmp_path / "out"), "--cuda"],
                 ["moe", "c.yml", str(tmp_path / "out"), "--device", "cuda:1"],
                 ["extract-lora", "--model", "a", "--base-model", "b", "--out-path", "o", "--device", "cuda"],
                 ["run", "r.yml", str(tmp_path / "out"), "--device", "gpu"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("ray-merge: error: --device ") and "\n" not in err, err


def test_trust_remote_code_reaches_tokenizer_loading(tmp_path, monkeypatch):
    from models import make_family
    from transformers import AutoTokenizer

    make_family(str(tmp_path), "llama", n_finetunes=1, seed=1, hidden=32, layers=2, intermediate=64)
    recipe = write_recipe(tmp_path / "r.yml", """
merge_method: linear
base_model: M/llama_base
models:
  - model: M/llama_base
    parameters: {weight: 0.5}
  - model: M/llama_ft0
    parameters: {weight: 0.5}
tokenizer:
  source: union
""", **{"M/": f"{tmp_path}/"})

    calls = []
    real = AutoTokenizer.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs.get("trust_remote_code"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(spy))
    assert cli.main(["run", recipe, str(tmp_path / "trusted"), "--trust-remote-code", "--quiet"]) == 0
    assert calls and all(c is True for c in calls), calls
    calls.clear()
    assert cli.main(["run", recipe, str(tmp_path / "default"), "--quiet"]) == 0
    assert calls and not any(calls), calls
