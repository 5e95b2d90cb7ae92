"""The systemd-native host, end to end inside the booted test host.

The project's units and generator are installed there, the shim runs as its service (the
systemd executor picked automatically), two busybox tenants come from file:// repos made on
this machine in the shared folder. The tests run in file order: the reboot comes last.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bitbuilder.hostshim.images.busybox import build_busybox_rootfs
from tests.helpers.gitserve import git
from tests.system.shimapi import call, install_shim, ok, shim_active, start_shim
from tests.system.testhost import TestHost

# What many servers have: every link managed, with DHCP. Tenant links must stay the shim's.
CATCH_ALL = "/etc/systemd/network/99-catch-all.network"
TENANTS = ("alpha", "beta")
MEMORY_MAX = 256 * 2**20


@dataclass
class Deployment:
    host: TestHost
    repos: Path

    def status(self, name: str) -> Any:
        return ok(self.host, "GET", f"/v1/machines/{name}")

    def leader(self, name: str) -> int:
        out = self.host.enter("machinectl", "show", "-p", "Leader", "--value", name).stdout
        return int(out.strip())

    def in_tenant(
        self, name: str, *argv: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run the test host's static busybox in the tenant's namespaces (mount: its files)."""
        return self.host.enter(
            "nsenter", "-t", str(self.leader(name)), "-m", "-n", "-u", *argv, check=check
        )

    def machines(self) -> list[str]:
        out = self.host.enter("machinectl", "list", "--no-legend").stdout
        return sorted(line.split()[0] for line in out.splitlines() if line.strip())


def write_revision(repo: Path, name: str, marker: str) -> str:
    """A tenant repo revision: a confext tree (etc) and a sysext tree (usr)."""
    conf = repo / "confext" / "greeting" / "etc" / "bitbuilder-greeting.conf"
    tool = repo / "sysext" / "tools" / "usr" / "lib" / "bitbuilder-tools" / "version"
    for path in (conf, tool):
        path.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(f"{name} {marker}\n")
    tool.write_text(f"tools {marker}\n")
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", marker, cwd=repo)
    return git("rev-parse", "HEAD", cwd=repo)


def spec(name: str, repos: Path, allow_host: bool) -> dict[str, object]:
    return {
        "name": name,
        "image": "busybox",
        "source": {"url": f"file://{repos / name}", "ref": {"branch": "main"}},
        "resources": {"memoryBytes": MEMORY_MAX, "tasks": 64, "cpuMillis": 500},
        "network": {"mode": "isolated", "allowHost": allow_host},
    }


@pytest.fixture(scope="module")
def deployment(testhost: TestHost, shared_dir: Path) -> Iterator[Deployment]:
    images, repos = shared_dir / "images", shared_dir / "repos"
    images.mkdir()
    build_busybox_rootfs(images / "busybox")
    for name in TENANTS:
        (repos / name).mkdir(parents=True)
        git("init", "-q", "-b", "main", cwd=repos / name)
        write_revision(repos / name, name, "r1")
    testhost.enter(
        "sh", "-c", f"printf '[Match]\\nName=*\\n[Network]\\nDHCP=yes\\n' > {CATCH_ALL}"
    )  # fmt: skip
    install_shim(testhost, repos, images)
    testhost.enter("systemctl", "enable", "bitbuilder-hostshim.service")
    start_shim(testhost)
    deployment = Deployment(testhost, repos)
    ok(testhost, "PUT", "/v1/images/busybox", {"path": str(images / "busybox")})
    for name in TENANTS:
        status = ok(testhost, "PUT", f"/v1/machines/{name}", spec(name, repos, name == "alpha"))
        assert status["phase"] == "Running", (status.get("machineError"), status.get("sourceError"))
    yield deployment
    for name in TENANTS:
        call(testhost, "DELETE", f"/v1/machines/{name}")


def test_tenants_are_units_listed_by_machinectl(deployment: Deployment) -> None:
    assert deployment.machines() == sorted(TENANTS)
    for name in TENANTS:
        unit = f"bitbuilder-tenant-{name}.service"
        props = deployment.host.enter(
            "systemctl", "show", "-p", "ActiveState,Slice,MemoryMax,TasksMax,CPUQuotaPerSecUSec",
            unit,
        ).stdout  # fmt: skip
        assert "ActiveState=active" in props
        assert "Slice=machine.slice" in props
        assert f"MemoryMax={MEMORY_MAX}" in props
        assert "TasksMax=64" in props
        assert "CPUQuotaPerSecUSec=500ms" in props
        machine_unit = deployment.host.enter(
            "machinectl", "show", "-p", "Unit", "--value", name
        ).stdout.strip()
        assert machine_unit == unit


def test_extensions_are_in_the_tenant_only(deployment: Deployment) -> None:
    for name in TENANTS:
        conf = deployment.in_tenant(name, "cat", "/etc/bitbuilder-greeting.conf").stdout
        assert conf == f"{name} r1\n"
        tool = deployment.in_tenant(name, "cat", "/usr/lib/bitbuilder-tools/version").stdout
        assert tool == "tools r1\n"
    host = deployment.host
    assert host.enter("test", "-e", "/etc/bitbuilder-greeting.conf", check=False).returncode == 1
    assert host.enter("test", "-e", "/usr/lib/bitbuilder-tools", check=False).returncode == 1


def ping(deployment: Deployment, name: str, address: str) -> bool:
    result = deployment.in_tenant(
        name, "/bin/busybox", "ping", "-c", "1", "-W", "2", address, check=False
    )
    return result.returncode == 0


def host_side(address: str) -> str:
    """The host's end of a tenant's /30 link: the machine is .2, the host .1."""
    head, last = address.rsplit(".", 1)
    return f"{head}.{int(last) - 1}"


def test_tenants_are_isolated_and_reach_what_their_spec_allows(deployment: Deployment) -> None:
    alpha, beta = (deployment.status(n)["address"] for n in TENANTS)
    assert alpha and beta and alpha != beta
    # The catch-all .network matches the tenant links too; the shim's file keeps networkd off.
    links = deployment.host.enter("networkctl", "list", "--no-legend").stdout
    tenant_links = [line.split() for line in links.splitlines() if line.split()[1].startswith("bb")]
    assert len(tenant_links) == len(TENANTS), links
    assert all(fields[-1] == "unmanaged" for fields in tenant_links), links
    assert ping(deployment, "alpha", host_side(alpha))  # allowHost: true
    assert not ping(deployment, "beta", host_side(beta))  # allowHost: false
    assert not ping(deployment, "alpha", beta)
    assert not ping(deployment, "beta", alpha)
    assert not ping(deployment, "alpha", host_side(beta))


def test_stopping_the_shim_leaves_tenants_running(deployment: Deployment) -> None:
    host = deployment.host
    leaders = {name: deployment.leader(name) for name in TENANTS}
    host.enter("systemctl", "stop", "bitbuilder-hostshim.service")
    assert not shim_active(host)
    assert deployment.machines() == sorted(TENANTS)
    for name, pid in leaders.items():
        assert deployment.leader(name) == pid
        state = host.enter("systemctl", "is-active", f"bitbuilder-tenant-{name}.service")
        assert state.stdout.strip() == "active"
    # The socket stayed with systemd: the next request starts the shim, which adopts them.
    for name, pid in leaders.items():
        status = deployment.status(name)
        assert status["phase"] == "Running"
        assert status["leaderPid"] == pid
    assert shim_active(host)


def test_reboot_brings_tenants_back_at_their_last_applied_revision(
    deployment: Deployment,
) -> None:
    host = deployment.host
    commit = write_revision(deployment.repos / "alpha", "alpha", "r2")
    status = ok(host, "PUT", "/v1/machines/alpha", spec("alpha", deployment.repos, True))
    assert status["appliedRevision"] == commit
    # No operator, no shim, no network: only the generator and setup-tenant@ may do it, and
    # the tenant repo is out of reach too.
    host.enter(
        "systemctl", "disable", "--now", "bitbuilder-hostshim.socket", "bitbuilder-hostshim.service"
    )  # fmt: skip
    repo, offline = deployment.repos / "alpha", deployment.repos / "alpha.offline"
    repo.rename(offline)
    try:
        host.reboot()
    finally:
        offline.rename(repo)
    assert deployment.machines() == sorted(TENANTS)
    assert not shim_active(host)
    for name in TENANTS:
        unit = f"setup-tenant@{name}.service"
        assert host.enter("systemctl", "is-active", unit).stdout.strip() == "active"
    assert (
        deployment.in_tenant("alpha", "cat", "/etc/bitbuilder-greeting.conf").stdout == "alpha r2\n"
    )
    assert (
        deployment.in_tenant("beta", "cat", "/etc/bitbuilder-greeting.conf").stdout == "beta r1\n"
    )
    start_shim(host)
    assert deployment.status("alpha")["appliedRevision"] == commit
    assert deployment.status("alpha")["phase"] == "Running"


def test_shipped_units_verify(deployment: Deployment) -> None:
    result = deployment.host.enter(
        "systemd-analyze", "verify", "--man=no",
        "/etc/systemd/system/bitbuilder-hostshim.service",
        "/etc/systemd/system/bitbuilder-hostshim.socket",
        "/etc/systemd/system/setup-tenant@.service",
        "/etc/systemd/system/bitbuilder-host-layers.service",
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
