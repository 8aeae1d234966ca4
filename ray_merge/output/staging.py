"""The output directory: staging, the journal of finished shards, and the final files.

Everything is written into ``<out>.ray-merge-partial`` next to the output and renamed
to ``<out>`` only when complete, so an interrupted run never leaves a directory that
looks finished. The journal records each finished, checksummed shard for --resume.
An output URL on object storage (no rename there) is laid out otherwise: see ``output/remote.py``.
"""
from __future__ import annotations

import fcntl
import json
import os
import platform
import re
import shutil
import socket
import sys
import tempfile
import time
from typing import Optional

from ray_merge.errors import UserError
from ray_merge.io.hub import snapshot_commit
from ray_merge.io.models import ModelRef, file_identity
from ray_merge.io.writer import checksum_file
from ray_merge.output.tokenizer import write_tokenizer
from ray_merge.planner.plan import Plan

JOURNAL = "journal.jsonl"
FINGERPRINT = "plan_fingerprint"
INPUTS = "inputs.json"  # the identity of every input weight file, recorded when the staging dir is made
LOCK = ".ray-merge.lock"  # held (flock) by the run writing the staging dir; names its pid and host


MANIFEST = "ray_merge_manifest.json"


def staging_dir(out_dir: str) -> str:
    return os.path.abspath(out_dir).rstrip("/") + ".ray-merge-partial"


def check_output_location(out_dir: str) -> str:
    """Refuse a non-empty output or an unwritable parent (creating it if needed); return the absolute path.

    An output path (or its staging path) that is a symbolic link is refused, whatever it points to (an
    empty directory, nothing, itself): the output is renamed into place at the end, which would replace
    the link rather than fill its target, so we say so before any tensor is read. Links in the
    directories above the output are fine.

    The location is checked for what would fail later: a file in the way, a read-only or virtual
    filesystem (``/proc``, ``/sys``), a directory that refuses new entries (tried by making and removing
    one, which also holds for root). An object-storage URL (``s3://...``) is returned as it is.
    """
    if re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*://", str(out_dir)) and not str(out_dir).lower().startswith("file://"):
        return out_dir  # object storage: checked where it is opened (output/remote.py)
    out_dir = os.path.abspath(out_dir)
    for path in (out_dir, staging_dir(out_dir)):
        if os.path.islink(path):
            raise UserError(f"output {path} is a symbolic link (to {os.readlink(path)}); give the real path "
                            "of the output directory instead")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"output {out_dir} already exists and is a file, not a directory; choose a new path")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise UserError(f"output {out_dir} already exists and is not empty; choose a new path or remove it")
    parent = os.path.dirname(out_dir) or "."
    existing = parent
    while not os.path.exists(existing):  # the nearest existing directory above the output
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"cannot create output {out_dir}: {existing} is a file, not a directory")
    fs = os.statvfs(existing)
    if fs.f_flag & os.ST_RDONLY:
        raise UserError(f"cannot create output {out_dir}: {existing} is on a read-only filesystem")
    if fs.f_blocks == 0:  # proc, sysfs, cgroup ...: no storage behind them
        raise UserError(f"cannot create output {out_dir}: {existing} is on a virtual filesystem with no storage "
                        f"({_fs_type(existing) or 'no disk'}); choose a directory on a disk")
    try:
        os.makedirs(parent, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".ray-merge-probe-", dir=parent))
    except OSError as e:
        raise UserError(f"output location {parent} is not writable: {e.strerror}")
    return out_dir


def _fs_type(path: str) -> Optional[str]:
    """The type of the filesystem holding ``path`` (Linux's mount table), or None."""
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split()[1:3] for line in f if len(line.split()) > 2]
    except OSError:
        return None
    real = os.path.realpath(path)
    best = max((m for m in mounts if real == m[0] or real.startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=None)
    return best[1] if best else None


class Staging:
    """The staging directory of one run, locked for as long as the run lasts.

    ``done``: shards a previous run finished whose files still match their journaled checksum.
    ``shard_dir``: where the executors write the shards (here: the staging directory itself). The
    object-storage counterpart, with the same methods, is ``output.remote.RemoteStaging``.
    """

    local = True

    def __init__(self, path: str, lock, done: dict[int, dict], out_dir: Optional[str] = None):
        self.path = path
        self.done = done
        self._lock = lock
        self.out_dir = out_dir

    @property
    def shard_dir(self) -> str:
        return self.path

    def journal(self, result) -> None:
        journal_shard(self.path, result)

    def finalize(self, plan: Plan, shard_records: dict[int, dict], **kw) -> None:
        finalize(plan, self.path, self.out_dir, shard_records, **kw)

    def exists(self) -> bool:
        return os.path.isdir(self.path)

    def discard(self) -> None:
        discard(self.path)

    def release(self) -> None:
        self._lock.close()


def prepare_output(out_dir: str, plan: Plan, *, resume: bool) -> Staging:
    """Create (or, with resume, reopen) the staging directory, locked; say which shards are finished.

    The free space is checked before anything is created. Reopening checks that no other run holds
    the directory, that the inputs are the files the interrupted run read, and each finished shard's
    checksum (a shard that no longer matches is redone).
    """
    out_dir = check_output_location(out_dir)
    stage = staging_dir(out_dir)
    if not os.path.isdir(stage):
        _check_space(out_dir, plan.bytes_written)
        try:
            os.mkdir(stage)
        except OSError as e:
            raise UserError(f"cannot create the staging directory: {e.strerror}", source=stage)
        lock = lock_staging(stage)
        try:
            with open(os.path.join(stage, FINGERPRINT), "w") as f:
                f.write(plan.fingerprint)
            _write_json(os.path.join(stage, INPUTS), input_identities(plan))
        except BaseException:
            discard(stage)
            lock.close()
            raise
        return Staging(stage, lock, {}, out_dir)
    lock = lock_staging(stage)
    try:
        if not resume:
            raise UserError(f"an interrupted merge left {stage}; rerun with --resume to finish it, or remove it")
        check_fingerprint(stage, plan)
        check_inputs(stage, plan)
        done = read_journal(stage)
        _check_space(out_dir, plan.bytes_written - sum(d["nbytes"] for d in done.values()))
    except BaseException:
        lock.close()
        raise
    return Staging(stage, lock, done, out_dir)


def _check_space(out_dir: str, need: int) -> None:
    parent = os.path.dirname(out_dir)
    free = shutil.disk_usage(parent).free
    if free < need:
        raise UserError(f"not enough disk space at {parent}: need {need / 1e9:.2f} GB, have {free / 1e9:.2f} GB")


def lock_staging(stage: str):
    """Take the staging directory's lock (the open lock file), or fail naming the run that holds it."""
    path = os.path.join(stage, LOCK)
    try:
        f = open(path, "a+")  # noqa: SIM115 (held open, locked, for the whole run)
    except OSError as e:
        raise UserError(f"cannot open the lock file: {e.strerror}", source=path)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"another ray-merge run ({holder}) is writing this output; wait for it to end", source=stage)
    if not os.path.exists(path) or os.stat(path).st_ino != os.fstat(f.fileno()).st_ino:
        f.close()  # the run that held it just finished (or gave up) and took its staging directory away
        raise UserError("another ray-merge run just finished or removed this staging directory; check the output",
                        source=stage)
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
    f.flush()
    return f


def discard(stage: str) -> None:
    """Remove a staging directory holding no finished shard: only the files ray-merge writes there
    (bookkeeping and unfinished ``.tmp`` shards); anything else keeps the directory."""
    for name in os.listdir(stage):
        if name in (FINGERPRINT, INPUTS, JOURNAL, LOCK) or name.endswith(".safetensors.tmp"):
            os.remove(os.path.join(stage, name))
    try:
        os.rmdir(stage)
    except OSError:
        pass  # files we did not write: left as they are


def input_identities(plan: Plan) -> dict[str, dict]:
    """Every input weight file of the plan with its size, modification time and header hash; a hub model's
    file by the commit it was planned at (immutable, and perhaps not downloaded here: workers fetch it)."""
    commits = {}
    for k, m in enumerate(plan.models):
        commit = None if os.path.isdir(ModelRef.parse(m.ref).path) else snapshot_commit(m.path)
        if commit:
            commits[k] = commit
    files = sorted({(i.file, i.model) for t in plan.tensors for i in t.inputs})
    return {f: {"hub_commit": commits[k]} if k in commits else file_identity(f) for f, k in files}


def check_inputs(stage: str, plan: Plan) -> None:
    """Refuse to resume when an input weight file changed since the staging directory was made."""
    path = os.path.join(stage, INPUTS)
    if not os.path.exists(path):  # made by an older version: record the inputs from now on
        _write_json(path, input_identities(plan))
        return
    try:
        with open(path) as f:
            recorded = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"unreadable record of the inputs ({e}); remove {stage} to start over", source=path)
    compare_inputs(recorded, plan, stage, path)


def compare_inputs(recorded, plan: Plan, stage: str, path: str) -> None:
    """Refuse to resume when the inputs recorded in ``path`` (of staging ``stage``) are not the plan's."""
    if not isinstance(recorded, dict):
        raise UserError(f"unreadable record of the inputs; remove {stage} to start over", source=path)
    current = input_identities(plan)
    for file in sorted(set(recorded) | set(current)):
        was, now = recorded.get(file), current.get(file)
        if was != now:
            if now is None or was is None:
                what = "is no longer an input" if now is None else "is a new input"
            else:
                what = f"changed ({', '.join(k for k in now if was.get(k) != now[k])} not as recorded)"
            raise UserError(f"input {what} since the interrupted merge began; the finished shards in {stage} "
                            "would mix old and new inputs: remove that directory to start over", source=file)


def check_fingerprint(stage: str, plan: Plan) -> None:
    """Refuse to resume a staging directory made for another recipe, other inputs or another seed."""
    fp_path = os.path.join(stage, FINGERPRINT)
    if os.path.exists(fp_path):
        with open(fp_path) as f:
            if f.read().strip() != plan.fingerprint:
                raise UserError(f"{stage} was written by a different recipe, inputs or seed; "
                                "remove it to start over")


def read_journal(stage: str) -> dict[int, dict]:
    """Shards recorded as finished whose files are still there, with the recorded size and checksum.

    A shard whose file no longer matches (a corrupted or half-overwritten file) is left out, to be
    redone, and we say so on stderr.
    """
    done = {}
    path = os.path.join(stage, JOURNAL)
    if not os.path.exists(path):
        return done
    checksums: dict[str, str] = {}
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a crash
            file = os.path.join(stage, rec["filename"])
            if not os.path.isfile(file) or os.path.getsize(file) != rec["nbytes"]:
                done.pop(rec["index"], None)
                continue
            if file not in checksums:
                checksums[file] = checksum_file(file)
            if checksums[file] == rec["checksum"]:
                done[rec["index"]] = rec
            else:
                done.pop(rec["index"], None)
                print(f"ray-merge: note: {file} does not match the checksum in the journal; redoing it",
                      file=sys.stderr)
    return done


def journal_shard(stage: str, result) -> None:
    rec = {"index": result.index, "filename": result.filename, "checksum": result.checksum,
           "nbytes": result.nbytes, "non_finite": result.non_finite, "time": time.time()}
    path = os.path.join(stage, JOURNAL)
    try:
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"cannot write: {e.strerror or e}", source=path) from e


def finalize(plan: Plan, stage: str, out_dir: str, shard_records: dict[int, dict], *,
             copy_tokenizer: bool = True, write_model_card: bool = True,
             extra_manifest: Optional[dict] = None) -> None:
    """Write index, config, tokenizer, card and manifest; then move the directory into place."""
    write_metadata(plan, stage, shard_records, copy_tokenizer=copy_tokenizer, write_model_card=write_model_card,
                   extra_manifest=extra_manifest)
    for leftover in (JOURNAL, FINGERPRINT, INPUTS):
        p = os.path.join(stage, leftover)
        if os.path.exists(p):
            os.remove(p)
    out_dir = os.path.abspath(out_dir)
    if os.path.isdir(out_dir) and not os.listdir(out_dir):
        os.rmdir(out_dir)
    # the lock file moves with the directory (a run starting now finds the staging directory locked,
    # or gone) and is removed from the output right after
    os.replace(stage, out_dir)
    if os.path.exists(os.path.join(out_dir, LOCK)):
        os.remove(os.path.join(out_dir, LOCK))


def write_metadata(plan: Plan, stage: str, shard_records: dict[int, dict], *, copy_tokenizer: bool = True,
                   write_model_card: bool = True, extra_manifest: Optional[dict] = None) -> None:
    """Index, config, generation config, tokenizer, recipe, card and manifest, written into ``stage``."""
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
        "shards": [{k: v for k, v in shard_records[s.index].items() if k != "non_finite"} for s in plan.shards],
        # NaN/inf values per merged tensor (inputs holding them pass them on: they are warned about, not hidden)
        "non_finite_values": {name: n for s in plan.shards
                              for name, n in shard_records[s.index].get("non_finite", {}).items()},
        "versions": package_versions(),
        **(extra_manifest or {}),
    }
    _write_json(os.path.join(stage, MANIFEST), manifest)


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
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as e:  # a full disk: name the file
        raise UserError(f"cannot write: {e.strerror or e}", source=tmp) from e
