"""The VM guest image: a small Debian forky directory with its kernel, initrd, udev and
networkd (DHCP on its ethernet link), built once with debootstrap and cached like the test host
(its own tarball and lock under the cache dir, keyed by its inputs)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.system.testhost import CULPRIT_UNITS, Flavour

GUEST_PACKAGES = (
    "systemd", "systemd-sysv", "udev", "kmod", "iproute2", "dbus",
    "linux-image-amd64", "initramfs-tools",
)  # fmt: skip


def configure_guest(root: Path) -> None:
    (root / "etc/machine-id").write_text("")
    (root / "etc/hostname").write_text("bb-vmguest\n")
    network = root / "etc/systemd/network"
    network.mkdir(parents=True, exist_ok=True)
    (network / "80-bb-ether.network").write_text("[Match]\nType=ether\n\n[Network]\nDHCP=yes\n")
    systemctl = ["systemctl", "--quiet", f"--root={root}"]
    subprocess.run([*systemctl, "enable", "systemd-networkd.service"], check=True)
    subprocess.run([*systemctl, "mask", *CULPRIT_UNITS], check=True)
    shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True)


GUEST = Flavour(
    "forky",
    GUEST_PACKAGES,
    "1",
    "vmguest-forky",
    script="/usr/share/debootstrap/scripts/sid",
    setup=configure_guest,
)
