"""Input models: resolving references to local directories and indexing their weights.

Only metadata is read here (config.json, safetensors headers, index files); tensors
are read lazily, one at a time, by ``WeightReader``.
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import json
import logging
import mmap
import os
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from ray_merge.errors import UserError
from ray_merge.io.hub import RangeFile, hub_file_url, read_range, snapshot_commit
from ray_merge.io.quantized import Quantized, dequantized_index, read_dequantized
from ray_merge.units import format_bytes

log = logging.getLogger("ray_merge")

WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
                   "pytorch_model.bin.index.json"]
META_PATTERNS = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
                 "added_tokens.json", "vocab.*", "merges.txt", "chat_template.*"]

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,  # FP8 checkpoints' power-of-two block scales
}


def resolve_model_dir(ref: ModelRef, *, weights: bool = True, allow_patterns: Optional[list[str]] = None) -> str:
    """A local directory holding the model: the path itself, or a hub snapshot.

    Hub references are fetched with huggingface_hub (or found in its cache when
    offline); only config, tokenizer and weight files are requested.
    """
    if os.path.isdir(ref.path):
        return os.path.abspath(ref.path)
    if ref.path.startswith((".", "/", "~")) or os.sep in ref.path.strip("/").replace("/", "", 1):
        raise UserError(f"model {ref}: no such directory")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError

        patterns = allow_patterns or (META_PATTERNS + (hub_weight_files(ref) if weights else []))
        return snapshot_download(ref.path, revision=ref.revision, allow_patterns=patterns)
    except HFValidationError:
        raise UserError(f"model {ref}: not a directory and not a valid hub id")
    except Exception as e:  # network errors, missing repos, offline cache misses
        raise UserError(
            f"model {ref}: not a local directory and not available from the Hugging Face hub "
            f"({type(e).__name__})"
        )


def hub_weight_files(ref: ModelRef) -> list[str]:
    """The weight files of a hub repository to fetch: one format only, safetensors when it has them.

    Repositories often ship the same weights twice (``*.safetensors`` and ``pytorch_model*.bin``, or a
    sharded ``model-*.safetensors`` set beside a ``consolidated.safetensors``); with an index, only the files
    it names are fetched. When the file list cannot be had (offline), the cached snapshot decides.
    """
    from huggingface_hub import HfApi, hf_hub_download

    try:
        files = set(HfApi().list_repo_files(ref.path, revision=ref.revision))
    except Exception:  # offline, or the hub unreachable: snapshot_download falls back to its cache
        return WEIGHT_PATTERNS
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if index in files:
            with open(hf_hub_download(ref.path, index, revision=ref.revision), encoding="utf-8") as f:
                named = set(json.load(f).get("weight_map", {}).values())
            return [index, *sorted(named)]
        if single in files:
            return [single]
    if any(f.endswith(".safetensors") for f in files):
        return ["*.safetensors"]
    return WEIGHT_PATTERNS


def plan_model(ref: ModelRef) -> tuple[str, dict, dict[str, TensorMeta]]:
    """A model's directory, config and tensors, for planning: nothing of a hub model's weights is downloaded.

    A local directory is indexed as it is. A hub model is fetched without its weights (config, tokenizer
    files) and its safetensors headers are read with HTTP byte range requests (PyTorch .bin weights: the zip
    directory and pickle of each file, loaded onto the meta device); each tensor's ``file`` is where the
    weights download will put it, in the same snapshot directory (see ``fetch_weights``). When that cannot be
    done (.bin files of the legacy, non-zip format; no hub: offline, the cache decides), the whole model is
    fetched, as ``resolve_model_dir`` does, after a notice giving its size.
    """
    if os.path.isdir(ref.path):
        path = resolve_model_dir(ref)
        return path, read_config(path, str(ref)), index_weights(path, str(ref))
    path = resolve_model_dir(ref, weights=False)
    config = read_config(path, str(ref))
    commit = snapshot_commit(path)
    pinned = ModelRef(ref.path, commit or ref.revision)  # the weights come from the commit planned with
    listing = _hub_plan_files(pinned, str(ref)) if commit else None
    if listing is None:
        path = resolve_model_dir(pinned)
        return path, config, index_weights(path, str(ref))
    files, sizes = listing
    if all(os.path.isfile(os.path.join(path, f)) for f in files):  # already in the cache
        return path, config, index_weights(path, str(ref))
    index: dict[str, TensorMeta] = {}
    for file in files:
        url = hub_file_url(pinned.path, file, pinned.revision)
        local = os.path.join(path, file)
        if file.endswith(".bin"):
            entries = _hub_bin_header(url)
            if entries is None:  # not readable in parts: the whole weights, now
                total = sum(sizes.get(f, 0) for f in files)
                log.warning("model %s: planning downloads its PyTorch .bin weights (%d file(s), %s): %s is not "
                            "in the zip format whose metadata can be read without the tensors", ref, len(files),
                            format_bytes(total), file)
                path = resolve_model_dir(pinned)
                return path, config, index_weights(path, str(ref))
        else:
            entries = {name: (tuple(info["shape"]), SAFETENSORS_DTYPES[info["dtype"]], info["file_offset"])
                       for name, info in _hub_safetensors_header(url).items()}
        for name, (shape, dtype, offset) in entries.items():
            if name in index:
                raise UserError(f"model {ref}: tensor {name} is in both {os.path.basename(index[name].file)} "
                                f"and {file}", source=url)
            index[name] = TensorMeta(local, shape, dtype, offset, hub_url=url)
    return path, config, dequantized_index(index, config if isinstance(config, dict) else {}, str(ref))


def _hub_plan_files(ref: ModelRef, label: str) -> Optional[tuple[list[str], dict[str, int]]]:
    """The weight files the weights download of a hub model fetches (as ``hub_weight_files`` chooses them:
    safetensors when there are any, else PyTorch .bin) and every file's size; None when the file list is not
    to be had (offline) or holds no weights."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.hf_api import RepoFile

    try:
        sizes = {f.path: f.size for f in HfApi().list_repo_tree(ref.path, revision=ref.revision, recursive=True)
                 if isinstance(f, RepoFile)}
    except Exception:  # offline, or the hub unreachable: the cache decides
        return None
    files = set(sizes)
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if index in files:
            try:
                idx_path = hf_hub_download(ref.path, index, revision=ref.revision)
            except Exception as e:
                raise UserError(f"model {label}: cannot fetch {index} from the hub ({type(e).__name__})")
            return _index_files(idx_path, label, listed=files), sizes
        if single in files:
            return [single], sizes
    named = sorted(f for f in files if f.endswith(".safetensors") and "/" not in f)
    return (named, sizes) if named else None


def _hub_bin_header(url: str) -> Optional[dict[str, tuple[tuple[int, ...], torch.dtype, None]]]:
    """Every tensor's shape and dtype in a hub PyTorch .bin file, read without its tensor data: the zip
    directory and the pickle (a few range requests; the pickle is loaded onto the meta device, weights-only).
    None when the file cannot be read so: the legacy (non-zip) format, or more metadata than RangeFile reads."""
    try:
        f = RangeFile(url)
        if f.size < 4 or f.read(4) != b"PK\x03\x04":
            return None
        f.seek(0)
        state = torch.load(f, map_location="meta", weights_only=True, mmap=False)
    except OSError:
        return None
    except Exception as e:  # HTTP errors, pickle errors come in many types
        raise UserError(f"cannot read PyTorch weights from the hub: {type(e).__name__}: {e}", source=url)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise UserError("cannot read PyTorch weights: not a state dict of named tensors", source=url)
    return {name: (tuple(t.shape), t.dtype, None) for name, t in state.items()}


def _hub_safetensors_header(url: str) -> dict:
    """A hub file's safetensors header, read with two byte range requests and validated as on disk."""
    try:
        head, size = read_range(url, 0, 8)
        n = _header_length(head, size)
        raw, _ = read_range(url, 8, 8 + n)
    except _HeaderError as e:
        raise UserError(f"corrupt safetensors header: {e}", source=url)
    except Exception as e:  # HTTP errors, a server ignoring the range
        raise UserError(f"cannot read safetensors header from the hub: {type(e).__name__}: {e}", source=url)
    return _checked_header(raw, n, size, url)


def fetch_weights(ref: str, model_dir: str, files: Iterable[str], *, each: bool = False) -> str:
    """The directory of a planned model with its weight files ``files`` present (only their names count).

    A hub model planned from its metadata has its weights downloaded now, from the commit it was planned
    with, into the same snapshot directory of this node's hub cache: with ``each``, exactly the missing files
    of ``files``, one by one; else its whole weights (as ``resolve_model_dir``). When ``files`` are all there
    already (or none), or the model is a local directory, nothing is done.
    """
    names = sorted({os.path.basename(f) for f in files})
    missing = [n for n in names if not os.path.isfile(os.path.join(model_dir, n))]
    if not missing:
        return model_dir
    parsed = ModelRef.parse(ref)
    commit = snapshot_commit(model_dir)
    if commit is None or os.path.isdir(parsed.path):
        return model_dir
    if not each:
        return resolve_model_dir(ModelRef(parsed.path, commit))
    from huggingface_hub import hf_hub_download

    for name in missing:
        try:
            got = hf_hub_download(parsed.path, name, revision=commit)
        except Exception as e:  # network errors, offline cache misses
            raise UserError(f"model {ref}: cannot download {name} at commit {commit[:12]} from the Hugging Face "
                            f"hub ({type(e).__name__})")
        model_dir = os.path.dirname(got)
    return model_dir


def index_weight_file(path: str, label: str) -> dict[str, TensorMeta]:
    """Every tensor of one safetensors file, as stored (a model read file by file)."""
    return {name: TensorMeta(path, tuple(info["shape"]), SAFETENSORS_DTYPES[info["dtype"]], info["file_offset"])
            for name, info in _read_safetensors_header(path).items()}


def read_config(model_dir: str, label: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"model {label}: no config.json in {model_dir}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"model {label}: config.json is not valid JSON ({e.msg if hasattr(e, 'msg') else e})",
                        source=path)


@dataclass(frozen=True)
class TensorMeta:
    file: str  # absolute path of the file holding it
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: Optional[int] = None  # where its bytes start in a safetensors file
    quant: Optional[Quantized] = None  # a quantized tensor, read dequantized (shape and dtype: dequantized)
    hub_url: Optional[str] = None  # a hub model planned before its download: where its file is read from

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's limit


class _HeaderError(ValueError):
    pass


def _no_duplicate_keys(pairs: list) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise _HeaderError(f"key {k!r} appears twice")
        out[k] = v
    return out


def _read_safetensors_header(path: str) -> dict:
    """Parse and validate a safetensors header without touching the tensor data.

    Checked as the safetensors library checks it: a sane header length, a JSON object, every
    tensor with a known dtype, a shape of non-negative integers and data offsets spanning exactly
    shape x itemsize bytes, the tensors' data contiguous, in order, without overlaps or gaps,
    ending exactly at the end of the file. Each tensor's info gets ``file_offset``, where its
    bytes start in the file.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = _header_length(f.read(8), size)
            raw = f.read(n)
    except OSError as e:
        raise UserError(f"cannot read safetensors header: {e.strerror or e}", source=path)
    except _HeaderError as e:
        raise UserError(f"corrupt safetensors header: {e}", source=path)
    return _checked_header(raw, n, size, path)


def _header_length(head: bytes, size: int) -> int:
    """The header length a safetensors file of ``size`` bytes starts with (its first 8 bytes: ``head``)."""
    if len(head) != 8:
        raise _HeaderError("file too short")
    n = int.from_bytes(head, "little")
    if n <= 0 or n > min(size - 8, MAX_HEADER_BYTES):
        raise _HeaderError(f"header length {n} out of range")
    return n


def _checked_header(raw: bytes, n: int, size: int, path: str) -> dict:
    """The parsed header (``raw``, ``n`` bytes) of a safetensors file of ``size`` bytes, validated."""
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"corrupt safetensors header: {e}", source=path)
    if not isinstance(header, dict):
        raise UserError("corrupt safetensors header: not a JSON object", source=path)
    meta = header.pop("__metadata__", None)
    if meta is not None and not isinstance(meta, dict):
        raise UserError("corrupt safetensors header: __metadata__ is not a JSON object", source=path)
    data_size = size - 8 - n
    spans = []
    for name, info in header.items():
        problem = _tensor_entry_problem(info)
        if problem:
            raise UserError(f"corrupt safetensors header: tensor {name}: {problem}", source=path)
        spans.append((info["data_offsets"][0], info["data_offsets"][1], name))
        info["file_offset"] = 8 + n + info["data_offsets"][0]
    spans.sort()
    for (start0, stop0, name0), (start, stop, name) in itertools.pairwise(spans):
        if start < stop0:
            raise UserError(f"corrupt safetensors header: tensor {name}: data_offsets [{start}, {stop}] overlap "
                            f"those of tensor {name0} [{start0}, {stop0}]", source=path)
    end = 0
    for start, stop, name in spans:
        if start != end:
            raise UserError(f"corrupt safetensors header: tensor {name}: data_offsets [{start}, {stop}] leave "
                            f"{start - end} bytes before them unclaimed", source=path)
        end = stop
    if end != data_size:
        raise UserError(f"corrupt safetensors header: the tensors' data ends at byte {end} but the file holds "
                        f"{data_size} bytes of data", source=path)
    return header


def _tensor_entry_problem(info) -> Optional[str]:
    """What is wrong with one tensor's header entry, or None."""
    if not isinstance(info, dict):
        return "entry is not a JSON object"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPES:
        return f"unknown dtype {dtype!r}"
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        return f"bad shape {shape!r}"
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
        return f"bad data_offsets {offsets!r}"
    need = SAFETENSORS_DTYPES[dtype].itemsize
    for d in shape:
        need *= d
    if offsets[1] - offsets[0] != need:
        return (f"shape {shape} {dtype} needs {need} bytes but data_offsets {offsets} span "
                f"{offsets[1] - offsets[0]}")
    return None


def index_weights(model_dir: str, label: str) -> dict[str, TensorMeta]:
    """Map every tensor name of a model to its file, shape and dtype.

    Quantized weights (block-scaled FP8, MXFP4) appear dequantized, without their scales (see
    io/quantized); other quantized formats are refused.
    """
    return dequantized_index(_raw_index(model_dir, label), _config_if_any(model_dir), label)


def _config_if_any(model_dir: str) -> dict:
    """config.json when the model has a readable one, else {} (read_config reports what is wrong with it)."""
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _raw_index(model_dir: str, label: str) -> dict[str, TensorMeta]:
    """Every tensor of the model's weight files, as stored."""
    st_files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    index: dict[str, TensorMeta] = {}
    if st_files:
        idx_path = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.isfile(idx_path):
            st_files = [os.path.join(model_dir, f) for f in _index_files(idx_path, label)]
        for path in st_files:
            for name, info in _read_safetensors_header(path).items():
                if name in index:
                    raise UserError(f"model {label}: tensor {name} is in both {os.path.basename(index[name].file)} "
                                    f"and {os.path.basename(path)}", source=path)
                index[name] = TensorMeta(path, tuple(info["shape"]), SAFETENSORS_DTYPES[info["dtype"]],
                                         info["file_offset"])
        return index
    bin_files = sorted(glob.glob(os.path.join(model_dir, "pytorch_model*.bin")))
    if bin_files:
        for path in bin_files:
            for name, t in _load_bin(path).items():
                index[name] = TensorMeta(path, tuple(t.shape), t.dtype)
        return index
    raise UserError(f"model {label}: no weights (*.safetensors or pytorch_model*.bin) in {model_dir}")


def _index_files(idx_path: str, label: str, listed: Optional[set[str]] = None) -> list[str]:
    """The weight files a safetensors index names, sorted.

    Every ``weight_map`` entry must be the plain name of a file in the model directory
    itself: no absolute path and no ``..`` or other directory part, so an index can never
    make us read a file outside the model (the file may be a symlink, as in the hub cache).
    ``listed``: the files of a hub repository, which the named files must be among (they
    are not downloaded yet).
    """
    try:
        with open(idx_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, OSError) as e:
        raise UserError(f"unreadable index: {e}", source=idx_path)
    if not isinstance(weight_map, dict):
        raise UserError("weight_map is not a JSON object", source=idx_path, key="weight_map")
    files = set()
    for name, file in weight_map.items():
        if not isinstance(file, str) or os.path.basename(file) != file or file in ("", ".", ".."):
            raise UserError(f"{file!r} is not the name of a file in the model directory",
                            source=idx_path, key=f"weight_map[{name!r}]")
        files.add(file)
    model_dir = os.path.dirname(idx_path)
    for file in sorted(files):
        present = file in listed if listed is not None else os.path.isfile(os.path.join(model_dir, file))
        if not present:
            raise UserError(f"model {label}: index lists missing shard {file}", source=idx_path)
    return sorted(files)


def file_identity(path: str) -> dict:
    """What identifies an input weight file's content cheaply: its size, modification time and a
    hash of its header (a safetensors header; the first MiB of another file)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            head = f.read(8)
            n = int.from_bytes(head, "little") if path.endswith(".safetensors") and len(head) == 8 else 0
            head += f.read(n if 0 < n <= MAX_HEADER_BYTES else (1 << 20) - len(head))
    except OSError as e:
        raise UserError(f"cannot read input: {e.strerror or e}", source=path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "header_sha256": hashlib.sha256(head).hexdigest()}


def _load_bin(path: str) -> dict[str, torch.Tensor]:
    """A PyTorch .bin file's tensors: memory-mapped (the zip format), or read whole (the legacy format of
    torch < 1.6, which cannot be mapped)."""
    try:
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as e:  # pickle errors come in many types
        raise UserError(f"cannot read PyTorch weights: {type(e).__name__}: {e}", source=path)


_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14


def _read_tensor(meta: TensorMeta) -> torch.Tensor:
    """A safetensors tensor, mapped copy-on-write with all its pages faulted in now.

    Called on the read-ahead thread: faulting the pages in here (one madvise,
    without the GIL) keeps that cost off the compute thread, which would
    otherwise take a page fault every 4 KiB of a lazily mapped tensor. The
    mapping is private, so the tensor is writable without touching the file,
    and it is unmapped when the tensor is freed.
    """
    if meta.numel == 0:
        return torch.empty(meta.shape, dtype=meta.dtype)
    start = meta.offset - meta.offset % mmap.ALLOCATIONGRANULARITY
    try:
        with open(meta.file, "rb") as f:
            mapped = mmap.mmap(f.fileno(), meta.offset - start + meta.nbytes, flags=mmap.MAP_PRIVATE,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot map weights: {getattr(e, 'strerror', None) or e}", source=meta.file)
    try:
        mapped.madvise(_MADV_POPULATE_READ)
    except OSError:  # an older kernel: a plain read into fresh memory instead
        mapped.close()
        return _read_into_memory(meta)
    flat = torch.frombuffer(mapped, dtype=meta.dtype, count=meta.numel, offset=meta.offset - start)
    return flat.view(meta.shape)


def _read_into_memory(meta: TensorMeta, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
    """Rows [start, stop) of a safetensors tensor (all of it by default), read into fresh memory.

    Only those bytes are read (``preadv``, no GIL held): nothing maps the rest of the
    tensor, so reading a few rows of a large embedding never makes it resident.
    """
    rows = meta.shape[0] if meta.shape else 1
    stop = rows if stop is None else min(stop, rows)
    start = min(start, stop)
    out = torch.empty((stop - start, *meta.shape[1:]) if meta.shape else (), dtype=meta.dtype)
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    offset = meta.offset + start * (meta.nbytes // max(rows, 1))
    try:
        fd = os.open(meta.file, os.O_RDONLY)
        try:
            done = 0
            while done < len(view):
                got = os.preadv(fd, [view[done:]], offset + done)
                if not got:
                    raise UserError(f"file ends inside tensor data (read {done} of {len(view)} bytes)",
                                    source=meta.file)
                done += got
        finally:
            os.close(fd)
    except OSError as e:
        raise UserError(f"cannot read weights: {e.strerror or e}", source=meta.file)
    return out


def same_data(tensors: list[tuple[str, TensorMeta]]) -> bool:
    """Whether (name, meta) tensors of several models hold the same dtype, shape and bytes.

    For the few non-float buffers (position ids, masks) the planner copies rather than merges:
    safetensors bytes are compared a chunk at a time, stopping at the first difference.
    """
    first = tensors[0][1]
    if any(m.dtype != first.dtype or m.shape != first.shape for _, m in tensors[1:]):
        return False
    if all(m.offset is not None for _, m in tensors):
        chunk = 1 << 24
        for pos in range(0, first.nbytes, chunk):
            n = min(chunk, first.nbytes - pos)
            want = _read_bytes(first, pos, n)
            if any(_read_bytes(m, pos, n) != want for _, m in tensors[1:]):
                return False
        return True
    values = [_read_into_memory(m) if m.offset is not None else _load_bin(m.file)[name] for name, m in tensors]
    return all(torch.equal(values[0], v) for v in values[1:])


def _read_bytes(meta: TensorMeta, pos: int, n: int) -> bytes:
    """``n`` bytes of a safetensors tensor's data, from byte ``pos`` of it."""
    if meta.hub_url is not None and not os.path.exists(meta.file):  # planning before the download
        start = meta.offset + pos
        try:
            data = read_range(meta.hub_url, start, start + n)[0]
        except Exception as e:
            raise UserError(f"cannot read weights from the hub: {type(e).__name__}: {e}", source=meta.hub_url)
    else:
        try:
            with open(meta.file, "rb") as f:
                f.seek(meta.offset + pos)
                data = f.read(n)
        except OSError as e:
            raise UserError(f"cannot read weights: {e.strerror or e}", source=meta.file)
    if len(data) != n:
        raise UserError("file ends inside tensor data", source=meta.file)
    return data


class WeightReader:
    """Reads tensors of one model lazily: safetensors tensors memory-mapped whole or row ranges
    read into memory; PyTorch .bin files loaded (memory-mapped) once."""

    def __init__(self, index: dict[str, TensorMeta]):
        self.index = index
        self._bins: dict[str, dict[str, torch.Tensor]] = {}

    def _bin(self, path: str) -> dict[str, torch.Tensor]:
        h = self._bins.get(path)
        if h is None:
            h = self._bins[path] = _load_bin(path)
        return h

    def read(self, name: str) -> torch.Tensor:
        meta = self.index[name]
        if meta.quant is not None:
            return read_dequantized(meta.quant, meta.dtype, self._read_raw)
        return self._read_raw(name, meta)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor; for safetensors only those bytes are read."""
        meta = self.index[name]
        if meta.quant is not None:
            return read_dequantized(meta.quant, meta.dtype, self._read_raw, start, stop)
        return self._read_raw(name, meta, start, stop)

    def _read_raw(self, name: str, meta: TensorMeta, start: Optional[int] = None,
                  stop: Optional[int] = None) -> torch.Tensor:
        """A tensor as stored, or its rows [start, stop)."""
        if meta.offset is not None:
            return _read_tensor(meta) if start is None else _read_into_memory(meta, start, stop)
        tensor = self._bin(meta.file)[name]
        return tensor if start is None else tensor[start:stop]

    def close(self) -> None:
        self._bins.clear()


@dataclass(frozen=True)
class ModelRef:
    """A model reference: a local path, or a hub id with an optional ``@revision``."""

    path: str
    revision: Optional[str] = None

    @classmethod
    def parse(cls, value: str) -> "ModelRef":
        value = str(value).strip()
        if "@" in value and not os.path.exists(value):
            path, _, rev = value.rpartition("@")
            return cls(path, rev or None)
        return cls(value)

    def __str__(self) -> str:
        return f"{self.path}@{self.revision}" if self.revision else self.path
