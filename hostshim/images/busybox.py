"""A tiny bootable root filesystem from the host's static busybox.

The demo imports it as the base image on a fresh host and the tests boot it: busybox init as
PID 1 runs a small web server (port 8080, serving /srv/www) from /etc/inittab.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))
OS_ID = "bitbuilder-test"
HTTP_PORT = 8080

_OS_RELEASE = f"""\
ID={OS_ID}
NAME="BitBuilder busybox test image"
PRETTY_NAME="BitBuilder busybox test image"
VERSION_ID=1
"""

# busybox init: SIGUSR2 is a clean poweroff (the runner's --kill-signal for this image).
_INITTAB = f"""\
::respawn:/bin/busybox httpd -f -p {HTTP_PORT} -h /srv/www
::shutdown:/bin/true
"""

_FILES: dict[str, str] = {
    "usr/lib/os-release": _OS_RELEASE,
    "etc/machine-id": "",
    "etc/hostname": "busybox\n",
    "etc/inittab": _INITTAB,
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
    "srv/www/index.html": "bitbuilder busybox image\n",
}
_DIRS = ("bin", "sbin", "usr/bin", "usr/sbin", "usr/lib", "etc", "proc", "sys", "dev", "run",
         "tmp", "var/tmp", "root", "srv/www")  # fmt: skip


def find_busybox() -> Path:
    for candidate in BUSYBOX_CANDIDATES:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("no static busybox found (apt-get install busybox-static)")


def build_busybox_rootfs(dest: Path, busybox: Path | None = None) -> Path:
    """Build the rootfs into `dest` (must not exist yet); returns `dest`.

    Built in a sibling temp dir and renamed into place, so a half-built tree is never seen.
    """
    source = busybox or find_busybox()
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    for d in _DIRS:
        (tmp / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, tmp / "bin/busybox")
    applets = subprocess.run(
        [str(source), "--list-full"], check=True, capture_output=True, text=True
    ).stdout.split()
    for applet in applets:
        link = tmp / applet
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath("/bin/busybox", "/" + os.path.dirname(applet)))
    (tmp / "sbin/init").unlink(missing_ok=True)
    (tmp / "sbin/init").symlink_to("../bin/busybox")
    for rel, text in _FILES.items():
        (tmp / rel).write_text(text)
    (tmp / "etc/os-release").symlink_to("../usr/lib/os-release")
    (tmp / "tmp").chmod(0o1777)
    tmp.rename(dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    """`bitbuilder-hostshim-mkimage DEST`: a minimal base image to import with PUT /v1/images."""
    parser = argparse.ArgumentParser(
        prog="bitbuilder-hostshim-mkimage",
        description="Build a small busybox root filesystem (busybox init, httpd on :8080).",
    )
    parser.add_argument("dest", type=Path, help="folder to create (must not exist)")
    args = parser.parse_args(argv)
    if args.dest.exists():
        parser.error(f"{args.dest} exists already")
    try:
        build_busybox_rootfs(args.dest)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"bitbuilder-hostshim-mkimage: {exc}", file=sys.stderr)
        return 1
    return 0
