"""The systemd-vmspawn command line: built from checked values only."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitbuilder.hostshim.api import ResourceLimits
from bitbuilder.hostshim.errors import MachineError
from bitbuilder.hostshim.machine.runtime.vmspawn import (
    QEMU_EXTRA,
    VmBoot,
    VmspawnMachine,
    guest_kernel,
    guest_mac,
    host_limits,
    vmspawn_argv,
    vmspawn_env,
)


def machine(**overrides: object) -> VmspawnMachine:
    fields: dict[str, object] = {
        "name": "vm1",
        "directory": Path("/run/bitbuilder/machines/vm1/root"),
        "raw": None,
        "boot": VmBoot(Path("/img/boot/vmlinuz-6.1"), Path("/img/boot/initrd.img-6.1")),
        "kvm": False,
        "tap": "bb0123456789a",
        "resources": ResourceLimits(),
    }
    fields.update(overrides)
    return VmspawnMachine(**fields)  # type: ignore[arg-type]


def test_directory_vm_under_tcg() -> None:
    argv = vmspawn_argv(machine(hostname="web"))
    assert argv[0] == "systemd-vmspawn"
    for expected in (
        "--kvm=no", "--register=no", "--keep-unit", "--machine=vm1",
        "--directory=/run/bitbuilder/machines/vm1/root", "--linux=/img/boot/vmlinuz-6.1",
        "--initrd=/img/boot/initrd.img-6.1", "--cpus=1", f"--ram={512 << 20}",
        "--console=read-only",
    ):  # fmt: skip
        assert expected in argv
    assert argv[-1] == "systemd.hostname=web"
    # vmspawn's own tap (vt-*) would be networkd's; qemu gets the shim's through the env.
    assert "--network-tap" not in argv
    extra = vmspawn_env(machine())[QEMU_EXTRA]
    assert "ifname=bb0123456789a,script=no,downscript=no" in extra
    assert f"mac={guest_mac('vm1')}" in extra
    # The shim's own monitor (its ACPI power button) goes first, then the NIC.
    both = vmspawn_env(machine(), "-qmp unix:/run/x/qmp.sock,server=on,wait=off")[QEMU_EXTRA]
    assert both.startswith("-qmp unix:/run/x/qmp.sock,server=on,wait=off -netdev tap,")


def test_guest_mac_is_stable_and_locally_administered() -> None:
    assert guest_mac("vm1") == guest_mac("vm1") != guest_mac("vm2")
    assert int(guest_mac("vm1").split(":")[0], 16) & 0b11 == 0b10  # local, unicast


def test_resources_size_the_vm() -> None:
    limits = ResourceLimits(cpu_millis=1500, memory_bytes=1 << 30)
    vm = machine(resources=limits, kvm=True, tap=None)
    assert {"--cpus=2", f"--ram={1 << 30}", "--kvm=yes"} <= set(vmspawn_argv(vm))
    assert vmspawn_env(vm) == {}
    # The cgroup around qemu holds the guest's RAM and qemu's own memory besides.
    assert host_limits(limits).memory_bytes == (1 << 30) + (256 << 20)
    assert host_limits(ResourceLimits()).memory_bytes == (512 << 20) + (256 << 20)


def test_raw_image_and_refusals() -> None:
    argv = vmspawn_argv(machine(directory=None, raw=Path("/var/lib/x/image.raw"), boot=VmBoot()))
    assert "--image=/var/lib/x/image.raw" in argv and not any(a.startswith("--linux") for a in argv)
    with pytest.raises(MachineError):
        vmspawn_argv(machine(raw=Path("/var/lib/x/image.raw")))  # both
    with pytest.raises(MachineError):
        vmspawn_argv(machine(directory=Path("/a:b")))  # vmspawn's list syntax
    with pytest.raises(MachineError):
        vmspawn_argv(machine(hostname="-bad-"))
    with pytest.raises(ValueError):
        vmspawn_argv(machine(name="Bad_Name"))
    with pytest.raises(MachineError):
        vmspawn_env(machine(tap="bb0,script=/x"))  # qemu's option syntax


def test_guest_kernel_is_found_in_the_images_boot(tmp_path: Path) -> None:
    with pytest.raises(MachineError) as caught:
        guest_kernel(tmp_path)
    assert "linux-image-amd64" in caught.value.message
    (tmp_path / "boot").mkdir()
    for name in ("vmlinuz-6.9.0-1-amd64", "vmlinuz-6.12.0-1-amd64", "initrd.img-6.12.0-1-amd64"):
        (tmp_path / "boot" / name).write_text("")
    boot = guest_kernel(tmp_path)
    assert boot.linux == tmp_path / "boot/vmlinuz-6.12.0-1-amd64"
    assert boot.initrd == tmp_path / "boot/initrd.img-6.12.0-1-amd64"
