"""Planning hub models reads their config and safetensors headers only; the weights are downloaded by `run`,
after the plan succeeded. Against a small hub served over HTTP on 127.0.0.1 (huggingface_hub honours HF_ENDPOINT).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import pytest
import torch
from conftest import load_dir, write_recipe
from safetensors.torch import load_file, save_file

from models import build_model, save_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"

LINEAR = """
merge_method: linear
models:
  - model: A
    parameters: {weight: 0.3}
  - model: B
    parameters: {weight: 0.7}
"""

TIES = """
merge_method: ties
base_model: A
models:
  - model: B
    parameters: {weight: 1.0, density: 0.5}
dtype: float32
"""


class Hub:
    """Serves directories as hub repositories: the model info and tree APIs, and the files under /resolve/
    (HEAD, GET, single byte ranges). Every request is logged as (method, repo, file, byte range or None)."""

    def __init__(self, repos: dict[str, str]):
        self.repos = repos
        self.log: list[tuple[str, str, str, tuple[int, int] | None]] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                hub.handle(self, head=False)

            def do_HEAD(self):
                hub.handle(self, head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def files(self, repo: str) -> list[str]:
        return sorted(os.listdir(self.repos[repo]))

    def handle(self, req: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlparse(req.path).path)
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo = "/".join(parts[2:4])
            if repo not in self.repos:
                return self.send(req, 404, b'{"error": "Repository not found"}', head, {"X-Error-Code": "RepoNotFound"})
            if parts[4] == "revision":
                body = {"id": repo, "modelId": repo, "sha": COMMIT,
                        "siblings": [{"rfilename": f} for f in self.files(repo)]}
            else:
                body = []
                for f in self.files(repo):
                    data = self.read(repo, f)
                    entry = {"type": "file", "path": f, "size": len(data), "oid": _sha1(data)}
                    if f.endswith(".safetensors"):
                        entry["lfs"] = {"oid": _sha256(data), "size": len(data), "pointerSize": 134}
                    body.append(entry)
            return self.send(req, 200, json.dumps(body).encode(), head, {"Content-Type": "application/json"})
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, file = "/".join(parts[:2]), "/".join(parts[4:])
            if repo not in self.repos or file not in self.files(repo):
                return self.send(req, 404, b"not found", head, {"X-Error-Code": "EntryNotFound"})
            data = self.read(repo, file)
            headers = {"X-Repo-Commit": COMMIT, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            if file.endswith(".safetensors"):
                headers.update({"X-Linked-Etag": f'"{_sha256(data)}"', "X-Linked-Size": str(len(data)),
                                "ETag": f'"{_sha256(data)}"'})
            else:
                headers["ETag"] = f'"{_sha1(data)}"'
            byte_range = _parse_range(req.headers.get("Range"), len(data))
            with self.lock:
                self.log.append((req.command, repo, file, byte_range))
            if byte_range is None:
                return self.send(req, 200, data, head, headers)
            start, stop = byte_range
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
            return self.send(req, 206, data[start:stop], head, headers)
        self.send(req, 404, b"not found", head, {})

    def read(self, repo: str, file: str) -> bytes:
        with open(os.path.join(self.repos[repo], file), "rb") as f:
            return f.read()

    @staticmethod
    def send(req, status: int, body: bytes, head: bool, headers: dict) -> None:
        req.send_response(status)
        for k, v in headers.items():
            req.send_header(k, v)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        if not head:
            req.wfile.write(body)

    def weight_gets(self) -> list[tuple[str, str, tuple[int, int] | None]]:
        """(repo, file, byte range) of every GET of a safetensors file."""
        with self.lock:
            return [(repo, f, r) for method, repo, f, r in self.log if method == "GET" and f.endswith(".safetensors")]


def _parse_range(value, size: int):
    if not value:
        return None
    first, _, last = value.removeprefix("bytes=").partition("-")
    start = int(first)
    stop = min(int(last) + 1, size) if last else size
    return start, stop


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _header_end(path: str) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub_repos")
    kw = dict(hidden=64, layers=2, intermediate=128)
    out = {
        "org/a": save_model(build_model("llama", seed=0, **kw), str(root / "a"), shard="40KB"),  # sharded
        "org/b": save_model(build_model("llama", seed=1, **kw), str(root / "b")),
        "org/wide": save_model(build_model("llama", seed=2, hidden=64, layers=2, intermediate=96),
                               str(root / "wide")),
    }
    short = save_model(build_model("llama", seed=3, **kw), str(root / "short"))
    tensors = load_file(os.path.join(short, "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, os.path.join(short, "model.safetensors"), metadata={"format": "pt"})
    out["org/short"] = short
    assert os.path.exists(os.path.join(out["org/a"], "model.safetensors.index.json"))
    return out


def _cli(hub: Hub, tmp_path, *args, offline: bool = False):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"),
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1",
               HF_HUB_ETAG_TIMEOUT="10", HF_HUB_DOWNLOAD_TIMEOUT="10", NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost")
    return subprocess.run([sys.executable, "-m", "ray_merge.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def _only_headers_read(hub: Hub, repos: dict[str, str]) -> None:
    """Every GET of a safetensors file asked for bytes inside its header, never the tensor data."""
    gets = hub.weight_gets()
    assert gets, "no safetensors header was read"
    for repo, file, byte_range in gets:
        assert byte_range is not None, f"{repo}/{file} downloaded whole"
        assert byte_range[1] <= _header_end(os.path.join(repos[repo], file)), (repo, file, byte_range)


def test_plan_reads_headers_only_and_run_downloads(repos, tmp_path):
    with Hub(repos) as hub:
        recipe = write_recipe(tmp_path / "hub.yml", TIES, A="org/a", B="org/b")
        res = _cli(hub, tmp_path, "plan", recipe)
        assert res.returncode == 0, res.stderr
        _only_headers_read(hub, repos)
        read = {(repo, f) for repo, f, _ in hub.weight_gets()}
        assert read == {(r, f) for r in ("org/a", "org/b") for f in hub.files(r) if f.endswith(".safetensors")}

        res = _cli(hub, tmp_path, "run", recipe, tmp_path / "out")
        assert res.returncode == 0, res.stderr
        whole = {(repo, f) for repo, f, r in hub.weight_gets() if r is None}
        assert whole == read  # each weight file downloaded once, whole

        requests = len(hub.log)
        res = _cli(hub, tmp_path, "plan", recipe, offline=True)  # offline: the cache, now complete, is planned
        assert res.returncode == 0, res.stderr
        assert len(hub.log) == requests

    local = write_recipe(tmp_path / "local.yml", TIES, A=repos["org/a"], B=repos["org/b"])
    subprocess.run([sys.executable, "-m", "ray_merge.cli", "run", local, str(tmp_path / "ref")], check=True,
                   capture_output=True)
    got, want = load_dir(tmp_path / "out"), load_dir(tmp_path / "ref")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("text, base, other, fragment", [
    (LINEAR, "org/b", "org/wide", "different shapes"),
    (TIES, "org/short", "org/b", "(only in the first: mlp.up_proj.weight; only in the second: none)"),
])
def test_incompatible_recipe_fails_before_any_download(repos, tmp_path, text, base, other, fragment):
    with Hub(repos) as hub:
        recipe = write_recipe(tmp_path / "bad.yml", text, A=base, B=other)
        res = _cli(hub, tmp_path, "run", recipe, tmp_path / "out")
        assert res.returncode == 2, res.stderr
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
        assert fragment in lines[0], lines[0]
        _only_headers_read(hub, repos)
    assert not os.path.exists(tmp_path / "out")


def test_unknown_hub_model_is_one_line(repos, tmp_path):
    with Hub(repos) as hub:
        recipe = write_recipe(tmp_path / "r.yml", LINEAR, A="org/b", B="org/nowhere")
        res = _cli(hub, tmp_path, "plan", recipe)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "org/nowhere" in lines[0], res.stderr


def _bin_repo(root, name: str, seed: int, *, shards: int = 1, legacy: bool = False) -> str:
    """A llama whose weights are PyTorch .bin files only (``shards`` of them, with an index when several)."""
    d = save_model(build_model("llama", seed=seed, hidden=128, layers=2, intermediate=512, dtype=torch.float32),
                   str(root / name))
    tensors = load_file(os.path.join(d, "model.safetensors"))
    os.remove(os.path.join(d, "model.safetensors"))
    names = sorted(tensors)
    kw = {"_use_new_zipfile_serialization": False} if legacy else {}
    if shards == 1:
        torch.save(tensors, os.path.join(d, "pytorch_model.bin"), **kw)
        return d
    weight_map = {}
    for k in range(shards):
        file = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = {n: tensors[n] for n in names[k::shards]}
        torch.save(part, os.path.join(d, file), **kw)
        weight_map.update({n: file for n in part})
    with open(os.path.join(d, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return d


def test_bin_weights_are_planned_from_their_metadata(repos, tmp_path):
    """A .bin-only repository is planned from each file's zip directory and pickle (byte ranges), not
    downloaded; `run` then downloads it and merges as from a local copy."""
    bins = {"org/bin": _bin_repo(tmp_path, "bin", 4, shards=2), "org/bin1": _bin_repo(tmp_path, "bin1", 5)}
    with Hub({**repos, **bins}) as hub:
        recipe = write_recipe(tmp_path / "hub.yml", LINEAR, A="org/bin", B="org/bin1")
        res = _cli(hub, tmp_path, "plan", recipe)
        assert res.returncode == 0, res.stderr
        assert "downloads" not in res.stderr
        bin_gets = [(repo, f, r) for method, repo, f, r in hub.log if method == "GET" and f.endswith(".bin")]
        assert {(repo, f) for repo, f, _ in bin_gets} == {
            (r, f) for r in bins for f in hub.files(r) if f.endswith(".bin")}
        for repo, file in {(repo, f) for repo, f, _ in bin_gets}:
            ranges = [r for rp, f, r in bin_gets if (rp, f) == (repo, file)]
            assert None not in ranges, f"{repo}/{file} downloaded whole"
            size = os.path.getsize(os.path.join(bins[repo], file))
            assert sum(b - a for a, b in ranges) < size * 0.6, (repo, file, ranges, size)

        res = _cli(hub, tmp_path, "run", recipe, tmp_path / "out")
        assert res.returncode == 0, res.stderr
    local = write_recipe(tmp_path / "local.yml", LINEAR, A=bins["org/bin"], B=bins["org/bin1"])
    subprocess.run([sys.executable, "-m", "ray_merge.cli", "run", local, str(tmp_path / "ref")], check=True,
                   capture_output=True)
    got, want = load_dir(tmp_path / "out"), load_dir(tmp_path / "ref")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_legacy_bin_weights_are_downloaded_after_a_notice(repos, tmp_path):
    legacy = _bin_repo(tmp_path, "legacy", 6, legacy=True)
    size = os.path.getsize(os.path.join(legacy, "pytorch_model.bin"))
    with Hub({**repos, "org/legacy": legacy, "org/zip": _bin_repo(tmp_path, "zip", 7)}) as hub:
        recipe = write_recipe(tmp_path / "hub.yml", LINEAR, A="org/legacy", B="org/zip")
        res = _cli(hub, tmp_path, "plan", recipe)
        assert res.returncode == 0, res.stderr
        assert f"model org/legacy: planning downloads its PyTorch .bin weights (1 file(s), {size / 2**20:.2f} MiB)" \
            in res.stderr, res.stderr
        assert "org/zip" not in res.stderr
        gets = [(repo, r) for method, repo, f, r in hub.log if method == "GET" and f == "pytorch_model.bin"]
        assert ("org/legacy", None) in gets  # downloaded whole
        assert gets and all(r is not None for repo, r in gets if repo == "org/zip")  # its metadata only
