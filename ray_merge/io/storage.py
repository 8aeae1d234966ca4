"""Output locations that are not local directories: any fsspec URL (``s3://bucket/prefix``, ``gs://...``,
``memory://`` ...), opened with its storage options.

A local path (or a ``file://`` URL, which names one) never comes here: local output is written with plain
file calls, as fast as before. Credentials and endpoints are fsspec's (for S3, s3fs and botocore read
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``~/.aws``); ``--storage-options
JSON`` adds keyword arguments for the filesystem (e.g. ``{"endpoint_url": "http://minio:9000"}``). The
options travel with the work to every Ray worker; nothing is kept in a global.
"""
from __future__ import annotations

import json
import re
from typing import Optional, Union

from ray_merge.errors import UserError, one_line

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def is_url(location: str) -> bool:
    """Whether ``location`` is an fsspec URL to write through fsspec (``file://`` is a local path)."""
    m = _SCHEME.match(str(location))
    return bool(m) and m.group(1).lower() != "file"


def local_path(location: str) -> str:
    """A local path as given, or the path a ``file://`` URL names."""
    location = str(location)
    if location.lower().startswith("file://"):
        return location[len("file://"):] or "/"
    return location


def parse_storage_options(value: Union[None, str, dict]) -> dict:
    """``--storage-options``: a JSON object (or a dict from the Python API) of filesystem keyword arguments."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return dict(value)
    try:
        parsed = json.loads(value)
    except ValueError as e:
        raise UserError(f"not valid JSON ({e})", key="--storage-options")
    if not isinstance(parsed, dict):
        raise UserError("must be a JSON object, e.g. '{\"endpoint_url\": \"http://host:9000\"}'",
                        key="--storage-options")
    return parsed


def filesystem(url: str, options: Optional[dict] = None):
    """(fsspec filesystem, path inside it) of an output URL, or a one-line error naming the URL."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url, **(options or {}))
    except ImportError as e:
        raise UserError(f"no filesystem for this URL is installed ({one_line(e)}); for s3:// install "
                        "ray-merge[s3] (s3fs)", source=url)
    except (ValueError, TypeError) as e:
        raise UserError(f"cannot open this location: {one_line(e)}", source=url)
    return fs, path.rstrip("/")


def storage_error(url: str, e: BaseException) -> UserError:
    """A failure of the object store (no such bucket, no credentials, endpoint unreachable, access denied)
    as one line naming the URL."""
    if isinstance(e, UserError):
        return e
    name = type(e).__name__
    if isinstance(e, FileNotFoundError):
        what = f"not found (no such bucket?): {one_line(e)}"
    elif isinstance(e, PermissionError):
        what = f"access denied: {one_line(e)}"
    elif name == "NoCredentialsError":
        what = ("no credentials (set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws, or --storage-options): "
                f"{one_line(e)}")
    elif "Connect" in name or "Timeout" in name:
        what = f"cannot reach the storage endpoint: {one_line(e)}"
    else:
        what = f"{name}: {one_line(e)}"
    return UserError(what, source=url)
