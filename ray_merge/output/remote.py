"""Output on object storage (any fsspec URL: ``s3://bucket/prefix``, ``gs://...``, ``memory://...``).

Layout. An object store has no rename (on S3 a "rename" copies every byte), so nothing is moved at the end:

- the shards are written straight to their final names, ``<out>/model-0000k-of-0000n.safetensors``, each
  by the worker that merged it, as one streamed (multipart) upload; an object only appears once its upload
  completes, so a worker killed mid-shard leaves no partial object;
- the run's bookkeeping lives under ``<out>.ray-merge-partial/``: the plan fingerprint, the inputs' identity,
  the lock, and the journal, one object per finished shard (``journal/00003.json``: objects cannot be
  appended to);
- finalize writes the tokenizer, recipe, card and manifest, then ``model.safetensors.index.json`` and
  ``config.json`` last of all, and only then removes the bookkeeping.

So an interrupted merge leaves shards without an index or a config (nothing loads it as a model: transformers,
vLLM and mergekit need both), plus the bookkeeping that ``--resume`` reads; a finished one holds exactly what
a local output holds, byte for byte, with no copy made.

The lock. An object store has no flock. The run writing an output holds ``<out>.ray-merge-partial/
.ray-merge.lock``, an object naming its host and pid, created only if absent (a conditional put, where the
store supports one) and rewritten every ``LOCK_REFRESH_S`` seconds while the run lasts. A run that finds it
refuses to start, naming the holder, unless the lock is stale: not refreshed for ``LOCK_STALE_S`` seconds
(its run died without removing it), or held by a process of this host that no longer exists. A stale lock
is taken over only as a local stale staging directory is: by ``--resume``.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from typing import Optional

from ray_merge.errors import UserError
from ray_merge.io.storage import filesystem, parse_storage_options, storage_error
from ray_merge.io.writer import checksum_file
from ray_merge.output.staging import (
    FINGERPRINT,
    INPUTS,
    LOCK,
    MANIFEST,
    compare_inputs,
    input_identities,
    write_metadata,
)
from ray_merge.planner.plan import Plan

JOURNAL_DIR = "journal"
LOCK_REFRESH_S = 30.0
LOCK_STALE_S = 300.0
# written last, in this order: an output holding both is complete
LAST = (MANIFEST, "model.safetensors.index.json", "config.json")


def staging_url(url: str) -> str:
    return url.rstrip("/") + ".ray-merge-partial"


class RemoteStaging:
    """The bookkeeping of one run writing to object storage, locked while the run lasts (see the module).

    The same methods as ``staging.Staging``; ``shard_dir`` is the output URL itself.
    """

    local = False

    def __init__(self, url: str, fs, root: str, options: dict):
        self.url = url.rstrip("/")
        self.path = staging_url(self.url)
        self.fs = fs
        self.root = root
        self.stage = root + ".ray-merge-partial"
        self.options = options
        self.done: dict[int, dict] = {}
        self._token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._beat: Optional[threading.Thread] = None

    @property
    def shard_dir(self) -> str:
        return self.url

    # -- the lock ------------------------------------------------------------------------------
    def _lock_record(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": self._token,
                           "time": time.time()}).encode()

    def _read_lock(self) -> Optional[dict]:
        try:
            rec = json.loads(self.fs.cat_file(f"{self.stage}/{LOCK}"))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # torn or foreign: treated as held (stale once old enough, by its modification time)
        return rec if isinstance(rec, dict) else {}

    def _holder(self, rec: dict) -> Optional[str]:
        """Who holds the lock, or None when it is stale."""
        when = rec.get("time")
        if not isinstance(when, (int, float)):
            try:
                when = self.fs.modified(f"{self.stage}/{LOCK}").timestamp()
            except Exception:
                when = 0
        age = time.time() - when
        if age > LOCK_STALE_S:
            return None
        if rec.get("host") == socket.gethostname() and isinstance(rec.get("pid"), int) and not _alive(rec["pid"]):
            return None
        return f"pid {rec.get('pid', '?')} on host {rec.get('host', '?')}, seen {max(age, 0):.0f}s ago"

    def _refuse(self, rec: dict) -> None:
        holder = self._holder(rec)
        if holder is not None:
            raise UserError(f"another ray-merge run ({holder}) is writing this output; wait for it to end (a lock "
                            f"not refreshed for {LOCK_STALE_S:.0f}s is stale)", source=self.url)

    def _take_lock(self, *, fresh: bool) -> None:
        path = f"{self.stage}/{LOCK}"
        if fresh:
            try:
                self.fs.pipe_file(path, self._lock_record(), mode="create")
            except FileExistsError:
                self._refuse(self._read_lock() or {})
                self.fs.pipe_file(path, self._lock_record())
            except (TypeError, NotImplementedError):  # a filesystem without conditional writes
                self.fs.pipe_file(path, self._lock_record())
        else:
            self.fs.pipe_file(path, self._lock_record())
        rec = self._read_lock()  # two runs that took it at once: the last write wins, the other stops here
        if not rec or rec.get("token") != self._token:
            self._refuse(rec or {})
            raise UserError("another ray-merge run took this output's lock at the same time", source=self.url)
        self._beat = threading.Thread(target=self._heartbeat, name="ray-merge-lock", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(LOCK_REFRESH_S):
            try:
                self.fs.pipe_file(f"{self.stage}/{LOCK}", self._lock_record())
            except Exception:
                pass  # the store is briefly unreachable: the next beat tries again

    def _stop_heartbeat(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None

    def release(self) -> None:
        self._stop_heartbeat()
        try:
            rec = self._read_lock()
            if rec and rec.get("token") == self._token:
                self.fs.rm_file(f"{self.stage}/{LOCK}")
        except Exception:
            pass  # unreachable now: the lock goes stale

    # -- the journal ----------------------------------------------------------------------------
    def journal(self, result) -> None:
        rec = {"index": result.index, "filename": result.filename, "checksum": result.checksum,
               "nbytes": result.nbytes, "non_finite": result.non_finite, "time": time.time()}
        path = f"{self.stage}/{JOURNAL_DIR}/{result.index:05d}.json"
        try:
            self.fs.pipe_file(path, (json.dumps(rec) + "\n").encode())
        except Exception as e:
            raise storage_error(self.fs.unstrip_protocol(path), e) from e

    def read_journal(self) -> dict[int, dict]:
        """Shards recorded as finished whose objects are still there with the recorded size and checksum."""
        jdir = f"{self.stage}/{JOURNAL_DIR}"
        self.fs.invalidate_cache(jdir)
        try:
            names = sorted(self.fs.ls(jdir, detail=False))
        except FileNotFoundError:
            return {}
        done = {}
        for path, raw in sorted(self.fs.cat(names).items()):
            try:
                rec = json.loads(raw)
                shard = f"{self.root}/{rec['filename']}"
            except (ValueError, KeyError, TypeError):
                continue
            try:
                size = self.fs.info(shard)["size"]
            except FileNotFoundError:
                continue
            if size != rec["nbytes"]:
                continue
            if checksum_file(shard, fs=self.fs) == rec["checksum"]:
                done[rec["index"]] = rec
            else:
                print(f"ray-merge: note: {self.url}/{rec['filename']} does not match the checksum in the journal; "
                      "redoing it", file=sys.stderr)
        return done

    # -- start, end -----------------------------------------------------------------------------
    def _staged(self) -> bool:
        self.fs.invalidate_cache(self.stage)
        try:
            return bool(self.fs.ls(self.stage, detail=False))
        except FileNotFoundError:
            return False

    def exists(self) -> bool:
        try:
            return self._staged()
        except Exception:
            return False  # unreachable now: nothing to clean up from here (and the first error is the one to show)

    def discard(self, plan: Optional[Plan] = None) -> None:
        """Remove this run's bookkeeping (and, given the plan, shards written but never journaled)."""
        self._stop_heartbeat()
        try:
            if plan is not None:
                for s in plan.shards:
                    path = f"{self.root}/{s.filename}"
                    if self.fs.exists(path):
                        self.fs.rm_file(path)
            self.fs.rm(self.stage, recursive=True)
        except FileNotFoundError:
            pass
        except Exception:
            pass  # an unreachable store: the error that brought us here says so

    def finalize(self, plan: Plan, shard_records: dict[int, dict], *, copy_tokenizer: bool = True,
                 write_model_card: bool = True, extra_manifest: Optional[dict] = None) -> None:
        """The metadata, made as for a local output, uploaded with the index and config last; then the
        bookkeeping removed."""
        with tempfile.TemporaryDirectory(prefix="ray-merge-meta-") as tmp:
            write_metadata(plan, tmp, shard_records, copy_tokenizer=copy_tokenizer,
                           write_model_card=write_model_card, extra_manifest=extra_manifest)
            names = []
            for base, _, files in os.walk(tmp):
                names += [os.path.relpath(os.path.join(base, f), tmp) for f in files]
            names = sorted(n for n in names if n not in LAST) + [n for n in LAST if n in names]
            try:
                for name in names:
                    self.fs.put_file(os.path.join(tmp, name), f"{self.root}/{name.replace(os.sep, '/')}")
            except Exception as e:
                raise storage_error(self.url, e) from e
        self._stop_heartbeat()
        try:
            self.fs.rm(self.stage, recursive=True)
        except Exception:
            pass  # the output is complete; leftover bookkeeping only blocks a new run into the same place


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare_remote_output(url: str, plan: Plan, *, resume: bool, storage_options=None) -> RemoteStaging:
    """Open (or, with resume, reopen) the bookkeeping of an output on object storage, locked; say which
    shards are finished. Failures of the store are one line naming the URL."""
    options = parse_storage_options(storage_options)
    fs, root = filesystem(url, options)
    if not root.strip("/") or (fs.root_marker == "" and "/" not in root.strip("/")):
        raise UserError("name a prefix inside the bucket (e.g. s3://bucket/my-merge): the output is written "
                        "next to its staging prefix, <prefix>.ray-merge-partial", source=url)
    st = RemoteStaging(url, fs, root, options)
    try:
        return _open(st, plan, resume)
    except UserError:
        raise
    except Exception as e:
        st.release()
        raise storage_error(url, e) from e


def _open(st: RemoteStaging, plan: Plan, resume: bool) -> RemoteStaging:
    fs = st.fs
    fs.invalidate_cache(st.root)
    if not st._staged():
        try:
            listed = fs.ls(st.root, detail=False)
        except FileNotFoundError:
            listed = []
        if listed:
            raise UserError("output already exists and is not empty; choose a new prefix or remove it",
                            source=st.url)
        st._take_lock(fresh=True)
        try:
            fs.pipe_file(f"{st.stage}/{FINGERPRINT}", plan.fingerprint.encode())
            fs.pipe_file(f"{st.stage}/{INPUTS}", (json.dumps(input_identities(plan), indent=2) + "\n").encode())
        except BaseException:
            st.discard()
            raise
        return st
    rec = st._read_lock()
    if rec is not None:
        st._refuse(rec)
    if not resume:
        raise UserError(f"an interrupted merge left {st.path}; rerun with --resume to finish it, or remove it "
                        f"(and the shards under {st.url})")
    st._take_lock(fresh=False)
    try:
        try:
            fp = fs.cat_file(f"{st.stage}/{FINGERPRINT}").decode().strip()
        except FileNotFoundError:
            fp = plan.fingerprint
        if fp != plan.fingerprint:
            raise UserError(f"{st.path} was written by a different recipe, inputs or seed; remove it (and the "
                            f"shards under {st.url}) to start over")
        inputs = f"{st.stage}/{INPUTS}"
        try:
            recorded = json.loads(fs.cat_file(inputs))
        except FileNotFoundError:
            recorded = input_identities(plan)
        except ValueError as e:
            raise UserError(f"unreadable record of the inputs ({e}); remove {st.path} to start over",
                            source=st.path + "/" + INPUTS)
        compare_inputs(recorded, plan, st.path, st.path + "/" + INPUTS)
        st.done = st.read_journal()
    except BaseException:
        st.release()
        raise
    return st
