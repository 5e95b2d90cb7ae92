"""A VM tenant's host side: its root, the guest's own layer, its link, and when it is up.

The root is an overlay under the run dir, as a container's is, shared with the guest over
virtiofs (vmspawn --directory): the image rootfs below a guest layer the shim writes for each
start, the tenant's writable layer (kept across restarts) as the upper dir. The guest layer
holds the revision's confext etc/ and sysext usr/ trees (copied, lowest first, so the first by
name is lowest as for containers), the repo's units with their WantedBy= links, and the
networkd file that gives the guest its address on the shim's link. So the guest boots straight
into the revision: no agent inside, nothing to merge at boot. The kernel and initrd come from
the image's /boot.

The layer is a copy with normalised modes (directories 0755, files readable by all) because
the revision checkout is private to root (0700 directories): as a layer, its etc/ would make
the guest's /etc unreadable to its non-root services (networkd exits with 200/CHDIR). The
upper dir's root takes the image root's mode for the same reason.

The overlay is mounted with mount(2): util-linux >= 2.39 hands options to fsconfig, which cuts
each value at 256 bytes, and a lowerdir= with a few revision trees is longer than that.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from bitbuilder.hostshim.errors import HostError, MachineError
from bitbuilder.hostshim.machine.layers import build_units_layer, tree_layers
from bitbuilder.hostshim.machine.network import Link
from bitbuilder.hostshim.machine.runtime.nspawn import check_path
from bitbuilder.hostshim.source.layout import Layout

GUEST_LAYER = "guest"  # in the run dir
QMP_SOCKET = "qmp.sock"  # in the run dir: the shim's own monitor on qemu
NETWORK_FILE = "etc/systemd/network/10-bitbuilder.network"
# A TCG boot takes 80-140 s on an idle 2-core machine; a loaded one is slower.
BOOT_DEADLINE = 900.0
# A guest's clean shutdown under TCG: systemd stops its units, then ACPI power-off.
POWER_OFF_DEADLINE = 90.0
MAX_UNIX_PATH = 107
MS_NODEV = 4

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def mount_overlay(target: Path, lowers: list[Path], upper: Path, work: Path) -> None:
    """Mount an overlay at `target`; `lowers` topmost first."""
    options = ",".join(
        [
            "lowerdir=" + ":".join(check_path(p) for p in lowers),
            f"upperdir={check_path(upper)}",
            f"workdir={check_path(work)}",
        ]
    )
    # nodev: a device node in the image must not open a host device through virtiofsd.
    if _libc.mount(b"overlay", bytes(target), b"overlay", MS_NODEV, options.encode()) != 0:
        errno = ctypes.get_errno()
        raise MachineError(f"cannot mount the VM's root at {target}: {os.strerror(errno)}")


def _network_file(link: Link) -> str:
    """The guest's one ethernet link gets the machine end of the /30; nothing else."""
    return (
        "# Written by the BitBuilder host shim: this VM's address on its link.\n"
        "[Match]\n"
        "Type=ether\n"
        "\n"
        "[Network]\n"
        f"Address={link.machine_address}\n"
        "LinkLocalAddressing=no\n"
        "IPv6AcceptRA=no\n"
    )


def _open_modes(top: Path) -> None:
    """Directories 0755, files readable by all (executable by all where the owner may)."""
    for dirpath, _dirs, files in os.walk(top):
        os.chmod(dirpath, 0o755)
        for name in files:
            path = os.path.join(dirpath, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                extra = 0o755 if mode & stat.S_IXUSR else 0o644
                os.chmod(path, (stat.S_IMODE(mode) | extra) & 0o755)


def guest_layer(dest: Path, layout: Layout | None, link: Link | None) -> Path:
    """The shim's layer over the guest's root: the revision's trees, units, the address."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if layout is not None:
        if layout.units:
            build_units_layer(dest, layout.units)
        # tree_layers checks each etc/ and usr/ is a real directory of the revision tree;
        # symlinks inside are copied as symlinks, for the guest to resolve in its own root.
        for top, trees in (("etc", layout.confext), ("usr", layout.sysext)):
            for tree in tree_layers(layout.root, trees, top):
                shutil.copytree(tree, dest / top, symlinks=True, dirs_exist_ok=True)
    if link is not None:
        network = dest / NETWORK_FILE
        network.parent.mkdir(parents=True, exist_ok=True)
        network.write_text(_network_file(link))
    _open_modes(dest)
    return dest


def prepare_upper(upper: Path, rootfs: Path) -> None:
    """The writable layer's root dir, with the image root's mode (it is the guest's /)."""
    upper.mkdir(parents=True, exist_ok=True)
    os.chmod(upper, stat.S_IMODE(os.stat(rootfs).st_mode))


def answers_ping(address: str) -> bool:
    try:
        result = subprocess.run(
            ["ping", "-c", "1", "-W", "1", "-q", address], capture_output=True, timeout=10
        )
    except FileNotFoundError as exc:
        raise HostError(
            "ping is not installed on the host: the shim waits for a VM to answer it "
            "(install iputils-ping)",
            reason="HostToolMissing",
        ) from exc
    return result.returncode == 0


def await_guest(address: str, alive: Callable[[], None], timeout: float = BOOT_DEADLINE) -> None:
    """Until the guest answers on its address (its kernel, udev and networkd are up), while
    `alive` raises if the VM is gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive()
        if answers_ping(address):
            return
    raise MachineError(
        f"the VM did not answer on {address} within {timeout:.0f}s", reason="BootTimeout"
    )


def qmp_argument(sock: Path) -> str:
    """qemu's option for the shim's monitor socket (vmspawn keeps its own QMP to itself)."""
    text = check_path(sock)
    if len(text) > MAX_UNIX_PATH:
        raise MachineError(f"the VM's monitor socket path is too long: {text}")
    return f"-qmp unix:{text},server=on,wait=off"


def _qmp_reply(stream: BinaryIO) -> None:
    """Read up to the reply of the last command (events may come first); raise on error."""
    for line in stream:
        message = json.loads(line)
        if "error" in message:
            raise MachineError(f"qemu refused: {message['error']}")
        if "return" in message:
            return
    raise MachineError("qemu closed its monitor")


def request_power_off(sock: Path) -> bool:
    """Press the VM's ACPI power button (QMP system_powerdown); False if qemu is not there."""
    with (
        contextlib.suppress(OSError, ValueError, MachineError),
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn,
    ):
        conn.settimeout(10)
        conn.connect(str(sock))
        stream = conn.makefile("rb")
        json.loads(stream.readline())  # the greeting
        for command in ("qmp_capabilities", "system_powerdown"):
            conn.sendall(json.dumps({"execute": command}).encode() + b"\n")
            _qmp_reply(stream)
        return True
    return False
