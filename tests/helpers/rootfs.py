"""The busybox test rootfs, built once per test session (and per pytest worker) and reused."""

from __future__ import annotations

import fcntl
from pathlib import Path

from bitbuilder.hostshim.images.busybox import build_busybox_rootfs

ROOTFS_NAME = "busybox-rootfs"


def cached_busybox_rootfs(cache_dir: Path) -> Path:
    """`cache_dir`/busybox-rootfs, built on first use; concurrent callers wait for the first."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    dest = cache_dir / ROOTFS_NAME
    with (cache_dir / f".{ROOTFS_NAME}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not dest.is_dir():
            build_busybox_rootfs(dest)
    return dest
