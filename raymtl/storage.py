"""Local folders and URIs (s3://, gs://, file://...) behind one small interface.

Everything raymtl writes (run files, TensorBoard events, saved models, predictions) goes through
pyarrow filesystems, so a laptop path and shared cluster storage work the same way.
"""

from __future__ import annotations

import functools
import os
import posixpath
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pyarrow.fs as pafs

from raymtl import urls


def is_uri(path: str) -> bool:
    return "://" in str(path)


def resolve(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI; `~` is expanded locally.

    A URI's filesystem is made once per scheme and bucket/host in a process (making one, with its
    credentials and region, is slow: an image reader resolves a URI per image); one with a query
    string (`?region=...`) configures its own.
    """
    path = str(path)
    if not is_uri(path):
        return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())
    parts = urlsplit(path)
    if parts.query:
        return pafs.FileSystem.from_uri(path)
    fs, root = _filesystem(parts.scheme, parts.netloc)
    inner = unquote(parts.path).strip("/")
    return fs, f"{root.rstrip('/')}/{inner}" if inner else root


@functools.lru_cache(maxsize=32)
def _filesystem(scheme: str, netloc: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(f"{scheme}://{netloc}/")


def normalize(path: str | os.PathLike) -> str:
    """A storage location in the form Ray Train expects: absolute local path or URI."""
    return str(path) if is_uri(str(path)) else resolve(path)[1]


def join(base: str, *parts: str) -> str:
    """`parts` below `base`; a URI's query (`?region=...`, which configures its filesystem) stays at the end."""
    if not is_uri(base):
        return os.path.join(base, *parts)
    path, mark, query = base.partition("?")
    return posixpath.join(path, *parts) + mark + query


def checkpoint_in(run_dir: str, checkpoint) -> str:
    """Where a Ray Train `Checkpoint` of the run `run_dir` lies, as a path `load` reads: its `.path`
    drops a URI's scheme (s3://bucket/run/checkpoint_x gives bucket/run/checkpoint_x)."""
    return join(run_dir, posixpath.basename(checkpoint.path.rstrip("/")))


def exists(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def read_text(path: str) -> str:
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read().decode()


_HTTP_SCHEMES = ("http", "https")


@dataclass(frozen=True)
class RetryPolicy:
    """How `read_bytes` tries again after a failure that may pass (`is_transient`): exponential backoff with
    jitter (so a throttled reader pool does not come back in step), or the server's Retry-After, each wait
    capped, all of them bounded, so a CDN's hiccup of seconds is ridden out and an outage fails soon."""

    attempts: int = 5  # tries in all
    base_delay_s: float = 0.5  # before the second try, doubled for each next one
    max_delay_s: float = 10.0  # one wait at most, a longer Retry-After included
    max_total_wait_s: float = 30.0  # all the waits of one read
    sleep: Callable[[float], None] = time.sleep  # tests record the waits instead

    def delay(self, retry: int, retry_after: float | None) -> float:
        """The wait before retry `retry` (0: the first): the server's Retry-After when it sent one, else
        backoff with jitter (half to all of it); at most `max_delay_s`."""
        if retry_after is not None:
            return min(retry_after, self.max_delay_s)
        return min(self.base_delay_s * 2**retry, self.max_delay_s) * random.uniform(0.5, 1.0)


RETRY = RetryPolicy()

# What pyarrow's S3 and GCS filesystems say of a failure that may pass (s3: "AWS Error <type> during <op>
# operation", "UNKNOWN (HTTP status <code>)"; gcs: "google::cloud::Status(<code>: ...)"); a missing object
# is a FileNotFoundError, never one of these.
_TRANSIENT_FS = re.compile(
    r"AWS Error (SLOW_DOWN|THROTTLING|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|REQUEST_TIMEOUT|NETWORK_CONNECTION)\b"
    r"|\(HTTP status (408|425|429|5\d\d)\)"
    r"|google::cloud::Status\((UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED|INTERNAL)\b"
)


class TransientReadError(RuntimeError):
    """A remote read that still failed, for a reason that may pass, after `RETRY`'s tries.

    Not an OSError: the image is not at fault, so the decoders, which count OSErrors as bad images, let
    it through, and it is no `DataError` either: the run fails and `training.max_failures` resumes it
    from its checkpoint, with the same data, instead of the row silently missing from its step.
    """


def is_transient(error: BaseException) -> bool:
    """Whether a failed read may succeed if tried again (HTTP 408/425/429/5xx, a dropped connection, a
    timeout, S3 or GCS throttling or unavailability); a 404/403, a missing local file never."""
    if isinstance(error, urls.GetError):
        return error.transient
    return _TRANSIENT_FS.search(str(error)) is not None


def read_bytes(path: str) -> bytes:
    """A whole file's bytes: a local path, a filesystem URI, or an http(s) URL (read-only,
    e.g. a CDN or presigned image URL; pyarrow has no http filesystem; read over a kept-alive
    connection, see `raymtl.urls`). A failure that may pass is tried again (`RETRY`) and, still
    failing, raises `TransientReadError`; any other raises at once (OSError)."""
    path, policy, waited = str(path), RETRY, 0.0
    for tried in range(1, policy.attempts + 1):
        try:
            return _read_once(path)
        except Exception as e:  # noqa: BLE001 -- pyarrow's GCS throttling is an ArrowCapacityError, no OSError
            if not is_transient(e):
                raise
            error = e
        budget = policy.max_total_wait_s - waited
        if tried == policy.attempts or budget <= 0:
            break
        wait = min(policy.delay(tried - 1, getattr(error, "retry_after", None)), budget)
        policy.sleep(wait)
        waited += wait
    # raised outside the handler, unchained: the console shows the root cause, and this one names the path
    raise TransientReadError(f"reading {path} failed {tried} times over {waited:.1f} s, for a reason that may pass "
                             f"(not counted as a bad image); last: {type(error).__name__}: {error}")


def _read_once(path: str) -> bytes:
    if is_uri(path) and urlsplit(path).scheme.lower() in _HTTP_SCHEMES:
        return urls.get(path)
    fs, p = resolve(path) if is_uri(path) else (pafs.LocalFileSystem(), path)
    with fs.open_input_stream(p) as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    fs, p = resolve(path)
    fs.create_dir(posixpath.dirname(p), recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(text.encode())


def upload_dir(local_dir: str, dest: str) -> None:
    """Copy a local folder's files to `dest` (a no-op when dest is that same local folder)."""
    if not is_uri(dest) and Path(dest).expanduser().resolve() == Path(local_dir).resolve():
        return
    fs, p = resolve(dest)
    fs.create_dir(p, recursive=True)
    pafs.copy_files(local_dir, p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_dir(src: str, local_dir: str) -> str:
    """Local folder holding `src`'s files: `src` itself when local, else a fresh copy."""
    if not is_uri(src):
        return resolve(src)[1]
    fs, p = resolve(src)
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(p, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local_dir


def remove_dir(path: str) -> None:
    """Delete the folder `path` and everything in it, if it exists."""
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.NotFound:
        fs.delete_dir(p)


def copy_dir(src: str | None, dest: str) -> str | None:
    """Replace the folder `dest` with a copy of the folder `src` (each local or a URI); returns `dest` normalized."""
    if src is None:
        return None
    src_fs, src_path = resolve(src)
    dest_fs, dest_path = resolve(dest)
    dest_fs.delete_dir_contents(dest_path, missing_dir_ok=True)
    dest_fs.create_dir(dest_path, recursive=True)
    pafs.copy_files(src_path, dest_path, source_filesystem=src_fs, destination_filesystem=dest_fs)
    return normalize(dest)
