"""File primitives every layer shares: content hashes and atomic replacement."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


SAMPLE_BLOCKS = 16
SAMPLE_BLOCK = 1 << 16


def sample_sha256(path: Path, size: int) -> str:
    """sha256 of SAMPLE_BLOCKS blocks at fixed offsets (first, last, evenly spaced between) and of
    the size: a file's quick fingerprint, read in O(1) whatever its size."""
    digest = hashlib.sha256(str(size).encode())
    span = max(0, size - SAMPLE_BLOCK)
    offsets = sorted({span * i // (SAMPLE_BLOCKS - 1) for i in range(SAMPLE_BLOCKS)})
    with open(path, "rb") as handle:
        for offset in offsets:
            handle.seek(offset)
            digest.update(handle.read(SAMPLE_BLOCK))
    return digest.hexdigest()


def write_json_atomic(path: Path, data: dict) -> None:
    """Replace `path` with `data` so that readers see the old or the new file, never a torn one.
    The temporary name is unique per process: two writers never share (and clobber) it."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as handle:
            json.dump(data, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def lock_file(target: Path) -> Path:
    """The lock ra's writers take for a file or folder they write: TARGET.lock beside it."""
    return target.with_name(target.name + ".lock")


@contextlib.contextmanager
def exclusive(target: Path, doing: str, on_wait=None):
    """Hold the exclusive lock on `target` (`lock_file`) for the block: a second ra process that
    wants it says so through `on_wait` and waits (Ctrl-C stops the wait). The lock is the OS's
    (flock): it dies with its process, so a killed process leaves no stale lock behind — only the
    empty file."""
    from filelock import FileLock, Timeout

    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_file(target)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if on_wait is not None:
            on_wait(f"another ra process is {doing}; waiting for it to finish (Ctrl-C stops waiting)")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def try_exclusive(target: Path):
    """The lock of `exclusive` on `target` if no other process holds it: yields True (held for the
    block) or False (another process holds it; nothing to undo)."""
    from filelock import FileLock, Timeout

    if not target.parent.is_dir():
        yield True  # nothing was ever locked there
        return
    lock = FileLock(str(lock_file(target)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def array_file(path: Path, mode: str, dtype=None, shape=None):
    """A .npy file memory-mapped for writing (numpy's open_memmap, `mode` "w+" or "r+"), its disk
    blocks reserved first. numpy makes a sparse file, and a memory map writing into a page the
    disk has no room for kills the process (SIGBUS: measured, `ra ingest` onto a full disk died
    with "Bus error"); reserved, a full disk is an OSError here, which the CLI says in one line."""
    import errno

    import numpy as np

    array = np.lib.format.open_memmap(path, mode=mode, dtype=dtype, shape=shape)
    if hasattr(os, "posix_fallocate"):
        descriptor = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(descriptor, 0, os.fstat(descriptor).st_size)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # a file system that cannot reserve: as before
                raise OSError(exc.errno, exc.strerror, str(path)) from None
        finally:
            os.close(descriptor)
    return array
