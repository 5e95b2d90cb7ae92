"""The systemd-vmspawn command line: built from checked values only."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitbuilder.hostshim.api import ResourceLimits
from bitbuilder.hostshim.errors import MachineError
from bitbuilder.hostshim.machine.runtime.vmspawn import (
    VmBoot,
    VmspawnMachine,
    guest_kernel,
    vmspawn_argv,
)


def machine(**overrides: object) -> VmspawnMachine:
    fields: dict[str, object] = {
        "name": "vm1",
        "directory": Path("/run/bitbuilder/machines/vm1/root"),
        "raw": None,
        "boot": VmBoot(Path("/img/boot/vmlinuz-6.1"), Path("/img/boot/initrd.img-6.1")),
        "kvm": False,
        "tap": True,
        "resources": ResourceLimits(),
    }
    fields.update(overrides)
    return VmspawnMachine(**fields)  # type: ignore[arg-type]


def test_directory_vm_under_tcg() -> None:
    argv = vmspawn_argv(machine(shares=((Path("/srv/rev/etc"), "confext"),), hostname="web"))
    assert argv[0] == "systemd-vmspawn"
    for expected in (
        "--kvm=no", "--register=no", "--keep-unit", "--machine=vm1", "--network-tap",
        "--directory=/run/bitbuilder/machines/vm1/root", "--linux=/img/boot/vmlinuz-6.1",
        "--initrd=/img/boot/initrd.img-6.1", "--cpus=1", f"--ram={512 << 20}",
        "--bind-ro=/srv/rev/etc:/run/bitbuilder/confext", "--console=read-only",
    ):  # fmt: skip
        assert expected in argv
    assert argv[-2:] == ["console=ttyS0", "systemd.hostname=web"]


def test_resources_size_the_vm() -> None:
    limits = ResourceLimits(cpu_millis=1500, memory_bytes=1 << 30)
    argv = vmspawn_argv(machine(resources=limits, kvm=True, tap=False))
    assert {"--cpus=2", f"--ram={1 << 30}", "--kvm=yes"} <= set(argv)
    assert "--network-tap" not in argv


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
