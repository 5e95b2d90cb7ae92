"""How the systemd executor turns the runner's nspawn command and limits into a unit."""

from __future__ import annotations

import fnmatch

import pytest

from bitbuilder.hostshim.api import ResourceLimits
from bitbuilder.hostshim.errors import MachineError
from bitbuilder.hostshim.machine.network import link_name
from bitbuilder.hostshim.systemd.executor import (
    environment_properties,
    limit_properties,
    registered_argv,
    service_type,
    unit_name,
)
from bitbuilder.hostshim.systemd.networkd import LINK_PATTERN

NSPAWN = ["/usr/bin/systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--boot"]


def test_nspawn_is_registered_with_machined_under_the_tenant_name() -> None:
    argv = registered_argv("web", NSPAWN)
    assert argv[:4] == ["/usr/bin/systemd-nspawn", "--register=yes", "--keep-unit", "--machine=web"]
    assert "--register=no" not in argv
    assert argv.count("--keep-unit") == 1
    assert argv[-2:] == ["--quiet", "--boot"]


def test_a_given_machine_name_is_kept() -> None:
    argv = registered_argv("web", [*NSPAWN, "--machine=web"])
    assert [a for a in argv if a.startswith("--machine")] == ["--machine=web"]


def test_other_commands_pass_unchanged() -> None:
    assert registered_argv("vm", ["systemd-vmspawn", "--register=no"]) == [
        "systemd-vmspawn",
        "--register=no",
    ]


def test_limits_become_unit_properties() -> None:
    limits = ResourceLimits(cpu_millis=1500, memory_bytes=512 * 2**20, tasks=100)
    assert limit_properties(limits) == [
        f"MemoryMax={512 * 2**20}",
        "CPUQuota=150%",
        "TasksMax=100",
    ]
    assert limit_properties(ResourceLimits()) == []
    assert limit_properties(ResourceLimits(cpu_millis=10)) == ["CPUQuota=1%"]


def test_unit_names_come_only_from_valid_tenant_names() -> None:
    assert unit_name("web-1") == "bitbuilder-tenant-web-1.service"
    with pytest.raises(ValueError):
        unit_name("../etc")


@pytest.mark.parametrize("name", ["web", "db", "a" * 63, "x-1"])
def test_the_networkd_pattern_matches_the_shims_link_names(name: str) -> None:
    assert fnmatch.fnmatchcase(link_name("0123abcd", name), LINK_PATTERN)


@pytest.mark.parametrize(
    "other", ["bbr0", "eth0", "bb0123456789ab0", "ve-web", "bb0123456789a"[:12]]
)
def test_the_networkd_pattern_leaves_other_links_alone(other: str) -> None:
    assert not fnmatch.fnmatchcase(other, LINK_PATTERN)


def test_a_vm_unit_is_exec_with_its_qemu_options_in_the_environment() -> None:
    assert service_type(NSPAWN) == "Type=notify"
    assert service_type(["/usr/bin/systemd-vmspawn", "--quiet"]) == "Type=exec"
    extra = "-qmp unix:/run/x/qmp.sock,server=on,wait=off -netdev tap,id=n,ifname=bb0"
    assert environment_properties({"SYSTEMD_VMSPAWN_QEMU_EXTRA": extra}) == [
        f'Environment="SYSTEMD_VMSPAWN_QEMU_EXTRA={extra}"'
    ]
    with pytest.raises(MachineError):
        environment_properties({"X": 'a" B=c'})  # would end the quoting
