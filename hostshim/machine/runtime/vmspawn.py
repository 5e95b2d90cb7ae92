"""What a VM needs from systemd-vmspawn (256+): the argv, built from checked values only.

The image is a directory shared over virtiofs (its kernel and initrd booted directly) or a raw
GPT disk. The revision's trees reach the guest as read-only virtiofs shares under
/run/bitbuilder/ in the guest (`--bind-ro`), which its units can layer as confext/sysext.
KVM is used where the host probe found it usable, TCG (software emulation) elsewhere. As for
nspawn, every path is the shim's own and is checked again here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from bitbuilder.hostshim.api import ResourceLimits
from bitbuilder.hostshim.errors import MachineError
from bitbuilder.hostshim.machine.runtime.nspawn import check_hostname, check_path
from bitbuilder.hostshim.paths import checked_name

VMSPAWN = "systemd-vmspawn"
GUEST_SHARES = Path("/run/bitbuilder")
DEFAULT_RAM = 512 << 20
MIN_RAM = 128 << 20


@dataclass(frozen=True)
class VmBoot:
    """Where the guest's kernel comes from: its own /boot (direct boot) or firmware (UEFI)."""

    linux: Path | None = None
    initrd: Path | None = None


@dataclass(frozen=True)
class VmspawnMachine:
    name: str
    directory: Path | None  # a directory image, shared over virtiofs
    raw: Path | None  # or a raw disk image (the machine's own copy)
    boot: VmBoot
    kvm: bool
    tap: bool  # a tap link on the host (vt-NAME); False: no network at all
    resources: ResourceLimits
    shares: tuple[tuple[Path, str], ...] = ()  # (host tree, name under GUEST_SHARES)
    hostname: str | None = None


def _version_key(kernel: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", kernel.name))


def guest_kernel(root: Path) -> VmBoot:
    """The newest vmlinuz-*/initrd.img-* pair in a directory image's /boot."""
    kernels = sorted((root / "boot").glob("vmlinuz-*"), key=_version_key)
    if not kernels:
        raise MachineError(
            f"image at {root} has no /boot/vmlinuz-*: a VM directory image needs its kernel "
            "(install linux-image-amd64 in it)",
            reason="ImageInvalid",
        )
    kernel = kernels[-1]
    initrd = root / "boot" / f"initrd.img-{kernel.name.removeprefix('vmlinuz-')}"
    return VmBoot(kernel, initrd if initrd.is_file() else None)


def _cpus(resources: ResourceLimits) -> int:
    return max(1, math.ceil((resources.cpu_millis or 1000) / 1000))


def _ram(resources: ResourceLimits) -> int:
    return max(MIN_RAM, resources.memory_bytes or DEFAULT_RAM)


def vmspawn_argv(machine: VmspawnMachine) -> list[str]:
    """The full command line that boots `machine` (its kernel command line last)."""
    name = checked_name(machine.name)
    if (machine.directory is None) == (machine.raw is None):
        raise MachineError("a VM needs exactly one of a directory or a raw image")
    argv = [
        VMSPAWN,
        "--quiet",
        "--register=no",
        "--keep-unit",
        f"--machine={name}",
        f"--kvm={'yes' if machine.kvm else 'no'}",
        "--vsock=no",
        "--tpm=no",
        "--pass-ssh-key=no",
        "--console=read-only",
        f"--cpus={_cpus(machine.resources)}",
        f"--ram={_ram(machine.resources)}",
    ]
    if machine.directory is not None:
        argv.append(f"--directory={check_path(machine.directory)}")
    else:
        assert machine.raw is not None
        argv.append(f"--image={check_path(machine.raw)}")
    if machine.boot.linux is not None:
        argv.append(f"--linux={check_path(machine.boot.linux)}")
    if machine.boot.initrd is not None:
        argv.append(f"--initrd={check_path(machine.boot.initrd)}")
    if machine.tap:
        argv.append("--network-tap")
    for tree, share in machine.shares:
        target = GUEST_SHARES / checked_name(share)
        argv.append(f"--bind-ro={check_path(tree)}:{target}")
    cmdline = ["console=ttyS0"]
    if machine.hostname is not None:
        cmdline.append(f"systemd.hostname={check_hostname(machine.hostname)}")
    return [*argv, *cmdline]
