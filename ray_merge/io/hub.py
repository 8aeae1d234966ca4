"""Reading parts of a hub repository's files over HTTP, without downloading them.

Planning a hub model needs only its safetensors headers (or, for PyTorch .bin weights, the zip directory and
pickle of each file): they are read with byte range requests to the file's hub URL (huggingface_hub's
endpoint, headers and session, so ``HF_ENDPOINT`` and tokens apply).
"""
from __future__ import annotations

import io
import os
from typing import Optional


def hub_file_url(repo: str, filename: str, revision: Optional[str]) -> str:
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo, filename, revision=revision)


def read_range(url: str, start: int, stop: int) -> tuple[bytes, int]:
    """Bytes [start, stop) of a hub file (fewer where the file ends first) and the file's size.

    The response is streamed and refused unless the server answers with that byte range (206), so a
    server ignoring the range never makes us download the whole file.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    headers = {**build_hf_headers(), "Range": f"bytes={start}-{stop - 1}", "Accept-Encoding": "identity"}
    with get_session().stream("GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as r:
        hf_raise_for_status(r)
        size = _range_total(r.headers.get("Content-Range"))
        if r.status_code != 206 or size is None:
            raise OSError(f"the server did not answer a byte range request (HTTP {r.status_code})")
        data = r.read()
    if len(data) != max(0, min(stop, size) - start):
        raise OSError(f"asked for bytes [{start}, {stop}) of a {size}-byte file, got {len(data)} bytes")
    return data, size


class RangeFile(io.RawIOBase):
    """A hub file, readable and seekable, read through byte range requests a block at a time (each block
    fetched once). torch.load reads a zip-format PyTorch .bin file's directory and pickle this way, not its
    tensor data; past ``limit`` fetched bytes a read fails (OSError) rather than download the file."""

    def __init__(self, url: str, block: int = 256 * 1024, limit: int = 64 * 2**20):
        super().__init__()
        self.url, self.block, self.limit = url, block, limit
        first, self.size = read_range(url, 0, block)
        self._blocks = {0: first}
        self.fetched = len(first)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self.size - self._pos))
        done = 0
        while done < n:
            k, at = divmod(self._pos + done, self.block)
            data = self._block(k)
            take = min(n - done, len(data) - at)
            view[done:done + take] = data[at:at + take]
            done += take
        self._pos += n
        return n

    def _block(self, k: int) -> bytes:
        data = self._blocks.get(k)
        if data is None:
            start = k * self.block
            if self.fetched + self.block > self.limit:
                raise OSError(f"reading more than {self.limit} bytes of the file's metadata")
            data, _ = read_range(self.url, start, min(start + self.block, self.size))
            self._blocks[k] = data
            self.fetched += len(data)
        return data


def _range_total(content_range: Optional[str]) -> Optional[int]:
    """The complete length in a ``Content-Range: bytes 0-7/1234`` header."""
    if not content_range or "/" not in content_range:
        return None
    total = content_range.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


def snapshot_commit(model_dir: str) -> Optional[str]:
    """The commit of a hub cache snapshot directory (``.../snapshots/<commit>``), else None."""
    parts = os.path.normpath(model_dir).split(os.sep)
    return parts[-1] if len(parts) > 2 and parts[-2] == "snapshots" else None
