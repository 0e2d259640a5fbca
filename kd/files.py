"""Publishing files so that no reader ever takes a half-written one for a finished one, and where caches live.

- :func:`write_json_atomic`, :func:`write_text_atomic`: temp file beside the target, fsync, rename.
- :func:`publish_dir`: a finished temp dir renamed into place as a cache entry.
- :func:`space_error`: a write that failed because the disk is full, said as such (torch and numpy report it as
  "unexpected pos ..." or "N requested and M written").
- :func:`free_bytes`, :func:`format_bytes`: room on the file system of a path (made or not yet), said for people.
- :func:`file_digest`: a file's hash, read in chunks (checkpoints, cache entries, pipeline outputs).
- :func:`cache_dir`: the one rule for cache locations: ``$KD_CACHE/<kind>`` when ``KD_CACHE`` is set, else
  ``~/.cache/kd-qa/<kind>`` (kinds: ``teacher_logits``, ``corpus``, ``features``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile


def write_json_atomic(path: str, obj) -> None:
    """Write JSON to a temp file beside ``path``, fsync, then rename: readers see the old or the new file whole."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_text_atomic(path: str, text: str) -> None:
    """:func:`write_json_atomic` for text (UTF-8)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def publish_dir(tmp: str, entry: str, marker: str = "meta.json") -> None:
    """Rename a finished temp dir to ``entry``, the cache entry it completes (``marker`` inside marks it whole).

    Debris of an interrupted writer (an ``entry`` without its marker) is cleared first; a concurrent writer of
    the same key that got there first wins harmlessly (same content). The caller removes ``tmp`` afterwards.
    """
    if os.path.isdir(entry) and not os.path.isfile(os.path.join(entry, marker)):
        shutil.rmtree(entry, ignore_errors=True)
    try:
        os.rename(tmp, entry)
    except OSError:
        if not os.path.isfile(os.path.join(entry, marker)):
            raise


def unwritable(directory: str) -> str | None:
    """None when a file can be created in ``directory`` (made if missing), else why not."""
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=directory)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        return f"{type(err).__name__}: {err}"
    return None


def cache_dir(kind: str) -> str:
    """Default cache location of one kind of cached data: ``$KD_CACHE/<kind>`` or ``~/.cache/kd-qa/<kind>``."""
    root = os.environ.get("KD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kd-qa")
    return os.path.join(root, kind)


def free_bytes(path: str) -> int:
    """Bytes free on the file system that holds ``path``, or will: its nearest existing parent's when it is missing."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    return shutil.disk_usage(existing).free


def format_bytes(n: int) -> str:
    """``n`` bytes for people, in decimal units as disks are sold and ``df -H`` counts: 950 B, 1.2 GB, 3.4 TB."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


FULL_DISK_BYTES = 2**20  # what is left free after a write failed for want of space


def space_error(err: BaseException, path: str, what: str) -> BaseException:
    """``err`` as it is, unless the file system of ``path`` is full: then an OSError(ENOSPC) that says so, with
    what was being written, where, and the bytes free. Call it before removing the partial output."""
    cause, full = err, False
    while cause is not None and not full:
        full = isinstance(cause, OSError) and cause.errno == errno.ENOSPC
        cause = cause.__cause__ or cause.__context__
    free = free_bytes(path)
    if not (full or free < FULL_DISK_BYTES):
        return err
    return OSError(errno.ENOSPC, f"No space left on device writing {what} to {path} ({free} bytes free on that "
                                 f"file system; {type(err).__name__}: {err}). Free some space, or point it "
                                 "elsewhere, then resume; what was written before is intact.")


@contextlib.contextmanager
def writing(path: str, what: str):
    """Re-raise a write that failed on a full disk as :func:`space_error` says it (anything else unchanged)."""
    try:
        yield
    except Exception as err:  # torch, numpy and safetensors each report a full disk in their own way
        error = space_error(err, path, what)
        if error is err:
            raise
        raise error from err


def file_digest(path: str, algorithm: str = "blake2b") -> str:
    """Hex digest of a file's bytes, read in chunks: ``blake2b`` (16 bytes) or any hashlib name (e.g. sha256)."""
    h = hashlib.blake2b(digest_size=16) if algorithm == "blake2b" else hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()
