"""Small file systems a test mounts itself, to put the shim in a host condition: a read-only
or full disk. Always unmounted on the way out, whatever the test did."""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def mounted_tmpfs(path: Path, size: str = "1m") -> Iterator[Path]:
    """A fresh tmpfs of `size` at `path` (made if missing)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "bb-test", str(path)], check=True
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def remount_readonly(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


def fill(folder: Path) -> None:
    """Write into `folder` until its file system has no space left."""
    with (folder / "filler").open("wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\0" * (64 << 10))
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
