"""Atomic, permission-aware file writes for key material and bundles.

Every file is written to a temporary name in its final directory and renamed into place, so a crash or a
full disk never leaves a half-written key or certificate where a reader (mosquitto, the gateway, an
installer) would pick it up. Private files are created 0600 from the first byte, never chmod-ed later,
so there is no window in which another user could open them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

PRIVATE = 0o600
PUBLIC = 0o644
PRIVATE_DIR = 0o700


def write_atomic(path: Path, data: bytes, *, mode: int = PUBLIC, fsync: bool = True) -> None:
    """Write `data` to `path` via a temporary file in the same directory, then rename over it."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        # umask may have removed bits from PUBLIC; make the final mode exact for both kinds.
        tmp.chmod(mode)
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if fsync:
        fsync_dir(path.parent)


def write_new(path: Path, data: bytes, *, mode: int = PUBLIC) -> None:
    """Create a file inside a staging directory that is itself renamed into place later.

    No per-file rename or fsync: the staging directory's rename is the atomic step, and one directory
    fsync covers it (see `staged_dir`).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    path.chmod(mode)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def staging_dir(parent: Path, name: str) -> Iterator[Path]:
    """A private temporary directory next to where `name` will live; removed unless moved away."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{name}.{secrets.token_hex(6)}.staging"
    tmp.mkdir(mode=PRIVATE_DIR)
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(staged: Path, final: Path, *, mode: int = 0o755, fsync: bool = True) -> None:
    """Rename a staged directory to its final name. Fails if `final` exists (no silent overwrite).

    With `fsync=False` the caller syncs the parent once after publishing many folders.
    """
    staged.chmod(mode)
    if final.exists():
        raise FileExistsError(final)
    # rename(2) onto an existing non-empty directory fails, so two racing writers cannot both win.
    staged.rename(final)
    if fsync:
        fsync_dir(final.parent)
