"""VMs in the booted forky test host (systemd 262 with vmspawn): the capability report there,
and one guest booted under TCG from the shim's vmspawn argv, shared by the tests that read it.

A TCG boot takes 80-140 s on 2 cores: one VM boots for the whole module."""

from __future__ import annotations

import json
import re
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bitbuilder.hostshim.api import ResourceLimits
from bitbuilder.hostshim.machine.runtime.vmspawn import (
    VmspawnMachine,
    guest_kernel,
    vmspawn_argv,
)
from tests.helpers.wait import wait_for
from tests.system.testhost import FORKY, TestHost, missing_prerequisites, restored_root
from tests.system.vmguest import GUEST

BOOT_DEADLINE = 420.0


@pytest.fixture(scope="module")
def forky(shared_dir: Path) -> Iterator[TestHost]:
    problems = missing_prerequisites()
    if problems:
        pytest.skip("no booted test host here: " + ", ".join(problems))
    devices = [Path("/dev/net/tun")] + ([Path("/dev/kvm")] if Path("/dev/kvm").exists() else [])
    with restored_root(flavour=FORKY) as root:
        host = TestHost(
            root, binds_rw=[shared_dir, *devices], console_log=shared_dir / "forky-console.log"
        )
        with host:
            yield host


def check_report(host: TestHost) -> dict[str, Any]:
    result = host.run(sys.executable, "-m", "bitbuilder.hostshim.main", "--check", "-o", "json")
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_check_in_forky_finds_vmspawn_and_picks_tcg(forky: TestHost) -> None:
    report = check_report(forky)
    caps = {c["name"]: c for c in report["capabilities"]}
    systemd = forky.enter("systemctl", "--version").stdout.split()[1]
    assert caps["vmspawn"]["available"] and caps["vmspawn"]["version"] == systemd
    assert int(systemd) >= 256
    for tool in ("qemu", "tcg", "virtiofsd", "importctl", "confext"):
        assert caps[tool]["available"], caps[tool]
    assert report["runtimes"] == {"nspawn": None, "vmspawn": None}
    # KVM here is PVM (or absent): unusable for a stock kernel, so VMs use TCG.
    assert not caps["kvm"]["available"]
    assert report["acceleration"] == "tcg"


class BootedVm:
    def __init__(self, host: TestHost, unit: str, guest: Path) -> None:
        self.host, self.unit, self.guest = host, unit, guest

    def console(self) -> str:
        return self.host.enter("journalctl", "-q", "-o", "cat", "-u", self.unit, check=False).stdout

    def taps(self) -> list[str]:
        links = self.host.enter("ip", "-o", "link", "show").stdout
        return re.findall(r"^\d+: (vt-[^:@]+)", links, re.M)

    def processes(self) -> list[str]:
        out = self.host.enter("ps", "-eo", "comm", check=False).stdout.split()
        return [p for p in out if p.startswith(("qemu", "virtiofsd"))]


@pytest.fixture(scope="module")
def vm(forky: TestHost, shared_dir: Path) -> Iterator[BootedVm]:
    with restored_root(workdir=shared_dir, flavour=GUEST) as guest:
        machine = VmspawnMachine(
            name=f"vm-{uuid.uuid4().hex[:6]}",
            directory=guest,
            raw=None,
            boot=guest_kernel(guest),
            kvm=False,
            tap=True,
            resources=ResourceLimits(cpu_millis=1000, memory_bytes=512 << 20),
        )
        unit = f"bb-{machine.name}.service"
        forky.enter(
            "systemd-run", f"--unit={unit}", "--property=KillMode=mixed", "--quiet",
            *vmspawn_argv(machine),
        )  # fmt: skip
        booted = BootedVm(forky, unit, guest)
        try:
            yield booted
        finally:
            forky.enter("systemctl", "stop", unit, check=False, timeout=120)
            forky.enter("systemctl", "reset-failed", unit, check=False)


def test_a_vm_boots_under_tcg_and_answers_ping(vm: BootedVm) -> None:
    wait_for(lambda: "login:" in vm.console(), BOOT_DEADLINE, 1.0, "the guest's login prompt")
    assert "Reached target" in vm.console()
    [tap] = vm.taps()

    def leased() -> str | None:
        status = vm.host.enter("networkctl", "status", tap, check=False).stdout
        found = re.search(r"Offered DHCP leases:\s*(\d+\.\d+\.\d+\.\d+)", status)
        return found.group(1) if found else None

    address = wait_for(leased, 120.0, 1.0, "a DHCP lease to the guest")
    vm.host.enter("ping", "-c", "1", "-W", "5", address)


def test_stopping_the_vm_leaves_no_qemu_virtiofsd_or_tap(vm: BootedVm) -> None:
    wait_for(lambda: "login:" in vm.console(), BOOT_DEADLINE, 1.0, "the guest's login prompt")
    assert vm.processes()
    vm.host.enter("systemctl", "stop", vm.unit, timeout=120)
    assert vm.processes() == []
    assert vm.taps() == []
