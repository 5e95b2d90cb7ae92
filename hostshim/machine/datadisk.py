"""A tenant's writable layer on a file system of its own size, so no tenant can fill the
host's state disk.

The layer (TenantPaths.data: the overlay's upper and work dirs) is an ext4 file system in a
sparse image file beside it (TenantPaths.data_image), loop-mounted `nodev,nosuid` while the
machine runs. A tenant that fills it gets ENOSPC inside its machine; the state disk loses at
most the image's size. (Chosen over project quotas, which need the state disk to be xfs or
ext4 mounted with prjquota: a loop image works on any host with loop devices.)

The image is made at the first start with the configured size and grown (never shrunk) when
the size grows. A data dir that already holds a layer without an image (made before quotas,
or with them turned off) is used as it is: it is never hidden under a new, empty image.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from bitbuilder.hostshim.errors import HostError, MachineError, host_error_from
from bitbuilder.hostshim.paths import TenantPaths

log = logging.getLogger(__name__)

MOUNT_OPTIONS = "loop,nodev,nosuid,noatime"


def _run(argv: list[str], what: str) -> None:
    try:
        result = subprocess.run(argv, capture_output=True, text=True)
    except FileNotFoundError as exc:
        package = "e2fsprogs" if argv[0].startswith(("mkfs", "resize2fs")) else "mount"
        raise HostError(
            f"{what}: {argv[0]} is not installed on the host: install the {package} package "
            "(or turn tenant disk quotas off with --tenant-disk-size 0)",
            reason="HostToolMissing",
        ) from exc
    if result.returncode != 0:
        error = result.stderr.strip()[:300]
        if argv[0] == "mount" and "loop" in error.lower():
            raise HostError(
                f"{what}: {error}: a tenant's disk is a loop-mounted image, so the shim needs "
                "loop devices (modprobe loop; in a container, /dev/loop-control and the "
                "/dev/loopN nodes), or turn tenant disk quotas off with --tenant-disk-size 0",
                reason="LoopDevicesMissing",
            )
        raise MachineError(f"{what}: {error}", reason="DataDiskFailed")


def _holds_a_layer(data: Path) -> bool:
    return data.is_dir() and not os.path.ismount(data) and any(data.iterdir())


def mount_data(paths: TenantPaths, size: int | None) -> None:
    """Mount the tenant's data image (made or grown to `size`) at its data dir; None: no
    quota for a new layer. An existing image is always used: it is the tenant's data."""
    data, image = paths.data, paths.data_image
    if os.path.ismount(data):
        return
    if not image.exists():
        if size is None or _holds_a_layer(data):
            data.mkdir(parents=True, exist_ok=True)
            return
        _make_image(image, size)
    elif size is not None and size > image.stat().st_size:
        _grow(image, size)
    data.mkdir(parents=True, exist_ok=True)
    _run(["mount", "-o", MOUNT_OPTIONS, str(image), str(data)], "cannot mount the tenant's disk")


def _make_image(image: Path, size: int) -> None:
    tmp = image.with_name(image.name + ".tmp")
    image.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tmp.open("wb") as out:
            os.fchmod(out.fileno(), 0o600)
            out.truncate(size)
        _run(
            ["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1",
             str(tmp)],
            "cannot make the tenant's disk",
        )  # fmt: skip
        tmp.rename(image)
    except OSError as exc:
        host = host_error_from(exc, "cannot make the tenant's disk")
        if host is None:
            raise
        raise host from exc
    finally:
        tmp.unlink(missing_ok=True)


def _grow(image: Path, size: int) -> None:
    """Before mounting: the image file first, then the file system into it (-f: it was
    unmounted cleanly by the last stop; a forced check would read the whole image)."""
    log.info("growing %s to %d bytes", image, size)
    with image.open("r+b") as out:
        out.truncate(size)
    _run(["resize2fs", "-f", str(image)], "cannot grow the tenant's disk")


def unmount_data(paths: TenantPaths) -> None:
    """Unmount the data image (its loop device goes with it); nothing mounted is fine."""
    if os.path.ismount(paths.data):
        result = subprocess.run(["umount", str(paths.data)], capture_output=True, text=True)
        if result.returncode != 0:
            raise MachineError(
                f"cannot unmount the tenant's disk {paths.data}: {result.stderr.strip()}",
                reason="MountBusy",
            )
