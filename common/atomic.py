"""Files and folders that never sit half-written under their final name.

    atomic_path(path)          a temporary path beside `path`; fsynced and renamed onto it on success
    atomic_file(path, mode)    the same, as an open file (text or binary)
    atomic_write(path, data)   atomic_file with its whole content (text or bytes)
    atomic_dir(out)            a temporary folder beside `out`, renamed into place on success
    file_digest(path)          {"size", "sha256"}: what checkpoints record and verify
"""
from __future__ import annotations

import hashlib
import os
import shutil
from contextlib import contextmanager


def fsync_dir(path: str) -> None:
    """Makes a rename inside `path` durable (best effort: some filesystems refuse a folder fsync)."""
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_path(path: str):
    """Yields a temporary path beside `path` for the caller to write (any writer: torch.save, savefig);
    on success it is fsynced and renamed onto `path` (and the folder fsynced); on failure removed."""
    tmp = f"{path}.tmp{os.getpid()}.{os.urandom(4).hex()}"     # unique even for writers on several hosts
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(path))


@contextmanager
def atomic_file(path: str, mode: str = "w"):
    """An open file ("w" text, UTF-8, or "wb") that appears under `path` only when complete."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f


def atomic_write(path: str, data: str | bytes) -> None:
    with atomic_file(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def file_digest(path: str) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return {"size": os.path.getsize(path), "sha256": h.hexdigest()}


@contextmanager
def atomic_dir(out: str):
    """Yields a temporary folder beside `out`; on success it replaces `out` (an old `out` is moved
    aside first and removed only after the new one is in place), on failure it is removed."""
    out = out.rstrip("/")
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.exists(out):
            old = f"{out}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
