"""What a VM needs from systemd-vmspawn (256+): the argv, built from checked values only.

The image is a directory shared over virtiofs (its kernel and initrd booted directly) or a raw
GPT disk. KVM is used where the host probe found it usable, TCG (software emulation) elsewhere.
The network is a tap link the shim made (its own name, its own filter) that qemu attaches to:
vmspawn's --network-tap would make a vt-* tap that the host's networkd configures itself
(80-vm-vt.network: its own addresses, a DHCP server), so qemu gets the link through
$SYSTEMD_VMSPAWN_QEMU_EXTRA instead. As for nspawn, every path is the shim's own and is
checked again here.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

from bitbuilder.hostshim.api import ResourceLimits
from bitbuilder.hostshim.errors import MachineError
from bitbuilder.hostshim.machine.runtime.nspawn import check_hostname, check_ifname, check_path
from bitbuilder.hostshim.paths import checked_name

VMSPAWN = "systemd-vmspawn"
QEMU_EXTRA = "SYSTEMD_VMSPAWN_QEMU_EXTRA"
DEFAULT_RAM = 512 << 20
MIN_RAM = 128 << 20
QEMU_OVERHEAD = 256 << 20  # qemu, its TCG translation cache, virtiofsd


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
    tap: str | None  # the host's tap link qemu attaches to; None: no network at all
    resources: ResourceLimits
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


def host_limits(resources: ResourceLimits) -> ResourceLimits:
    """The VM's cgroup limits: its RAM is the spec's memory, so the cgroup around qemu (and
    its virtiofsd) gets that plus qemu's own overhead, else a full guest is OOM-killed."""
    return resources.model_copy(update={"memory_bytes": _ram(resources) + QEMU_OVERHEAD})


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
    # vmspawn itself puts console=hvc0 (its virtio console) on the kernel command line.
    cmdline: list[str] = []
    if machine.hostname is not None:
        cmdline.append(f"systemd.hostname={check_hostname(machine.hostname)}")
    return [*argv, *cmdline]


def guest_mac(name: str) -> str:
    """A stable locally administered MAC per machine (the guest's link keeps its name)."""
    digest = hashlib.sha256(checked_name(name).encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


def vmspawn_env(machine: VmspawnMachine, *extra: str) -> dict[str, str]:
    """The environment vmspawn needs besides its argv: qemu's NIC on the shim's tap, and
    `extra` qemu options (the shim's monitor)."""
    options = list(extra)
    if machine.tap is not None:
        tap = check_ifname(machine.tap)
        options.append(
            f"-netdev tap,id=bbnet,ifname={tap},script=no,downscript=no "
            f"-device virtio-net-pci,netdev=bbnet,mac={guest_mac(machine.name)}"
        )
    return {QEMU_EXTRA: " ".join(options)} if options else {}
