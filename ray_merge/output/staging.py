"""The output directory: staging, the journal of finished shards, and the final files.

Everything is written into ``<out>.ray-merge-partial`` next to the output and renamed
to ``<out>`` only when complete, so an interrupted run never leaves a directory that
looks finished. The journal records each finished, checksummed shard for --resume.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from typing import Optional

from ray_merge.errors import UserError
from ray_merge.output.tokenizer import write_tokenizer
from ray_merge.planner.plan import Plan

JOURNAL = "journal.jsonl"


MANIFEST = "ray_merge_manifest.json"


def staging_dir(out_dir: str) -> str:
    return os.path.abspath(out_dir).rstrip("/") + ".ray-merge-partial"


def check_output_location(out_dir: str) -> str:
    """Refuse a non-empty output or an unwritable parent (creating it if needed); return the absolute path."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise UserError(f"output {out_dir} already exists and is not empty; choose a new path or remove it")
    parent = os.path.dirname(out_dir) or "."
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output location {parent}: {e.strerror}")
    if not os.access(parent, os.W_OK):
        raise UserError(f"output location {parent} is not writable")
    return out_dir


def prepare_output(out_dir: str, plan: Plan, *, resume: bool) -> tuple[str, dict[int, dict]]:
    """Create (or, with resume, reopen) the staging directory; return it and the finished shards."""
    out_dir = check_output_location(out_dir)
    parent = os.path.dirname(out_dir)
    stage = staging_dir(out_dir)
    done: dict[int, dict] = {}
    if os.path.isdir(stage):
        if resume:
            done = read_journal(stage, plan)
        else:
            raise UserError(f"an interrupted merge left {stage}; rerun with --resume to finish it, or remove it")
    else:
        os.makedirs(stage)
        with open(os.path.join(stage, "plan_fingerprint"), "w") as f:
            f.write(plan.fingerprint)
    need = plan.bytes_written
    free = shutil.disk_usage(stage).free
    if free < need - sum(d["nbytes"] for d in done.values()):
        raise UserError(f"not enough disk space at {parent}: need {need / 1e9:.2f} GB, have {free / 1e9:.2f} GB")
    return stage, done


def read_journal(stage: str, plan: Plan) -> dict[int, dict]:
    """Shards recorded as finished, whose files are still there with the recorded size."""
    fp_path = os.path.join(stage, "plan_fingerprint")
    if os.path.exists(fp_path):
        with open(fp_path) as f:
            if f.read().strip() != plan.fingerprint:
                raise UserError(f"{stage} was written by a different recipe, inputs or seed; "
                                "remove it to start over")
    done = {}
    path = os.path.join(stage, JOURNAL)
    if not os.path.exists(path):
        return done
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a crash
            file = os.path.join(stage, rec["filename"])
            if os.path.isfile(file) and os.path.getsize(file) == rec["nbytes"]:
                done[rec["index"]] = rec
    return done


def journal_shard(stage: str, result) -> None:
    rec = {"index": result.index, "filename": result.filename, "checksum": result.checksum,
           "nbytes": result.nbytes, "time": time.time()}
    with open(os.path.join(stage, JOURNAL), "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def finalize(plan: Plan, stage: str, out_dir: str, shard_records: dict[int, dict], *,
             copy_tokenizer: bool = True, write_model_card: bool = True,
             extra_manifest: Optional[dict] = None) -> None:
    """Write index, config, tokenizer, card and manifest; then move the directory into place."""
    missing = [s.index for s in plan.shards if s.index not in shard_records]
    if missing:
        raise RuntimeError(f"shards {missing} were never written")
    weight_map = {}
    for s in plan.shards:
        for name in s.tensors:
            weight_map[name] = s.filename
    index = {"metadata": {"total_size": sum(t.out_bytes for t in plan.tensors)}, "weight_map": weight_map}
    _write_json(os.path.join(stage, "model.safetensors.index.json"), index)
    _write_json(os.path.join(stage, "config.json"), plan.out_config)

    donor_dir = plan.models[plan.donor].path
    gen = os.path.join(donor_dir, "generation_config.json")
    if os.path.exists(gen):
        shutil.copyfile(gen, os.path.join(stage, "generation_config.json"))
    write_tokenizer(plan.tokenizer, stage, donor_dir, copy_tokenizer)
    recipe_yaml = plan.recipe.to_yaml()
    with open(os.path.join(stage, "ray_merge_config.yml"), "w") as f:
        f.write(recipe_yaml)
    if write_model_card:
        with open(os.path.join(stage, "README.md"), "w") as f:
            f.write(model_card(plan, recipe_yaml))
    manifest = {
        "recipe_sha256": plan.recipe.hash,
        "plan_fingerprint": plan.fingerprint,
        "merge_method": plan.method,
        "random_seed": plan.seed,
        "inputs": [{"ref": m.ref, "path": m.path} for m in plan.models],
        "shards": [shard_records[s.index] for s in plan.shards],
        "versions": package_versions(),
        **(extra_manifest or {}),
    }
    _write_json(os.path.join(stage, MANIFEST), manifest)
    for leftover in (JOURNAL, "plan_fingerprint"):
        p = os.path.join(stage, leftover)
        if os.path.exists(p):
            os.remove(p)
    out_dir = os.path.abspath(out_dir)
    if os.path.isdir(out_dir) and not os.listdir(out_dir):
        os.rmdir(out_dir)
    os.replace(stage, out_dir)


def model_card(plan: Plan, recipe_yaml: str) -> str:
    import yaml

    recipe = plan.recipe
    refs = [m.ref for m in plan.models]
    base = str(recipe.base_model) if recipe.base_model else None
    front = {"base_model": refs, "library_name": "transformers", "tags": ["merge", "ray-merge"]}
    others = [r for r in refs if r != base]
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        f"# {os.path.basename(os.path.abspath(plan.models[plan.donor].path))} merge",
        "",
        "This model is a merge of pre-trained language models made with ray-merge.",
        "",
        "## Merge details",
        f"Merge method: `{plan.method}`" + (f", with `{base}` as the base." if base else "."),
        "",
        "Models merged:",
        *[f"- {r}" for r in others],
        "",
        "## Recipe",
        "",
        "```yaml",
        recipe_yaml.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def package_versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("ray-merge", "torch", "safetensors", "transformers", "ray"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _write_json(path: str, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
