"""Host layers from git, end to end in a booted test host of their own.

A HostLayersSpec from a signed file:// repo: its confext (/etc) and sysext (/usr) are merged on
the host by systemd-confext/-sysext and never reach a running tenant; a new commit refreshes,
a revert rolls back, an unsigned commit is refused with the merged revision kept, a reboot
with neither shim nor repo merges the applied revision before the tenant is restored, and a
DELETE unmerges. The tests run in file order.

The host has its own root: a merged /etc is read-only, which the other system tests' host must
not be. A merged /usr hides mounts below /usr, so the bound-in Python's pieces under /usr (the
Debian interpreter and its standard library) are copied into this root instead of bound.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bitbuilder.hostshim.images.busybox import build_busybox_rootfs
from bitbuilder.hostshim.source.extrelease import parse_os_release
from tests.helpers.gitserve import Content, Signer, TenantRepo, ssh_signer
from tests.system.shimapi import call, install_shim, ok, shim_active, start_shim
from tests.system.testhost import TestHost, python_binds, restored_root

TENANT = "gamma"
PROFILE = "base"
CONF = "/etc/bitbuilder-host.conf"
TOOL = "/usr/bin/bitbuilder-host-tool"
UNIT_LINKS = (
    "etc/systemd/system/multi-user.target.wants/bitbuilder-hostshim.service",
    "etc/systemd/system/sockets.target.wants/bitbuilder-hostshim.socket",
)


@dataclass
class HostLayersSite:
    host: TestHost
    repo: TenantRepo
    signer: Signer
    release: str  # an extension-release the host's os-release accepts
    commits: dict[str, str]

    def spec(self) -> dict[str, Any]:
        return {
            "name": PROFILE,
            "source": {
                "url": self.repo.file_url(),
                "ref": {"branch": "main"},
                "verify": {"sshKeys": [self.signer.public_key]},
            },
        }

    def put(self) -> Any:
        return ok(self.host, "PUT", f"/v1/host/layers/{PROFILE}", self.spec())

    def commit(self, marker: str, signed: bool = True) -> str:
        files: dict[str, Content] = {
            "confext/bbconf/etc/extension-release.d/extension-release.bbconf": self.release,
            f"confext/bbconf{CONF}": f"host {marker}\n",
            "sysext/bbtools/usr/lib/extension-release.d/extension-release.bbtools": self.release,
            f"sysext/bbtools{TOOL}": f"#!/bin/sh\necho tool {marker}\n",
        }
        self.repo.write(files)
        (self.repo.work / f"sysext/bbtools{TOOL}").chmod(0o755)
        commit = self.repo.commit(message=marker, signer=self.signer if signed else None)
        self.commits[marker] = commit
        return commit

    def on_host(self) -> tuple[str, str]:
        """(the merged config file, the merged tool's output) as the host sees them."""
        conf = self.host.enter("cat", CONF, check=False).stdout
        tool = self.host.run(TOOL, check=False).stdout
        return conf, tool

    def in_tenant(self, path: str) -> bool:
        """Does `path` exist inside the running tenant (its own mount namespace)?"""
        leader = self.host.enter("machinectl", "show", "-p", "Leader", "--value", TENANT).stdout
        found = self.host.enter(
            "nsenter", "-t", leader.strip(), "-m", "/bin/busybox", "test", "-e", path, check=False
        )  # fmt: skip
        return found.returncode == 0


def copy_usr_parts(root: Path) -> list[Path]:
    """Copy this machine's Python pieces under /usr into `root`; returns the rest to bind."""
    binds = []
    for path in python_binds():
        if Path("/usr") not in path.parents:
            binds.append(path)
            continue
        dest = root / path.relative_to("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-a", "--no-preserve=links", str(path), str(dest)], check=True)
    return binds


@pytest.fixture(scope="module")
def site(shared_dir: Path) -> Iterator[HostLayersSite]:
    work = shared_dir / "host-layers"
    images = work / "images"
    images.mkdir(parents=True)
    build_busybox_rootfs(images / "busybox")
    repo = TenantRepo(work / "repos", "host.git")
    signer = ssh_signer(work / "keys", "ops")
    with restored_root() as root:
        binds = copy_usr_parts(root)
        os_release = parse_os_release((root / "usr/lib/os-release").read_text())
        release = f"ID={os_release['ID']}\n" + (
            f"VERSION_ID={os_release['VERSION_ID']}\n" if "VERSION_ID" in os_release else ""
        )
        host = TestHost(root, binds_ro=binds, binds_rw=[work], console_log=work / "console.log")
        with host:
            yield HostLayersSite(host, repo, signer, release, {})
            call(host, "DELETE", f"/v1/host/layers/{PROFILE}")
            call(host, "DELETE", f"/v1/machines/{TENANT}")


@pytest.fixture(scope="module")
def deployed(site: HostLayersSite) -> HostLayersSite:
    host, work = site.host, site.repo.bare.parent.parent
    install_shim(host, work, work / "images")
    host.enter(
        "systemctl", "enable", "bitbuilder-hostshim.socket", "bitbuilder-hostshim.service",
        "bitbuilder-host-layers.service",
    )  # fmt: skip
    start_shim(host)
    ok(host, "PUT", "/v1/images/busybox", {"path": str(work / "images" / "busybox")})
    tenant = {"name": TENANT, "image": "busybox", "network": {"mode": "none"}}
    assert ok(host, "PUT", f"/v1/machines/{TENANT}", tenant)["phase"] == "Running"
    return site


def test_signed_revision_is_merged_on_the_host_and_not_in_the_tenant(
    deployed: HostLayersSite,
) -> None:
    commit = deployed.commit("r1")
    status = deployed.put()
    assert status["phase"] == "Applied", status
    assert status["appliedRevision"] == commit
    assert (status["sysext"], status["confext"]) == (["bbtools"], ["bbconf"])
    assert deployed.on_host() == ("host r1\n", "tool r1\n")
    assert deployed.in_tenant("/etc/os-release")  # the probe sees the tenant's own files
    assert not deployed.in_tenant(CONF)
    assert not deployed.in_tenant(TOOL)
    # Only the profile's links: systemd reports exactly these merged.
    merged = deployed.host.enter("systemd-sysext", "list", "--no-legend").stdout
    assert "bbtools" in merged


def test_a_new_commit_refreshes(deployed: HostLayersSite) -> None:
    commit = deployed.commit("r2")
    status = deployed.put()
    assert status["appliedRevision"] == commit
    assert status["previousRevision"] == deployed.commits["r1"]
    assert deployed.on_host() == ("host r2\n", "tool r2\n")
    assert deployed.put()["appliedRevision"] == commit  # the same again changes nothing


def test_a_revert_rolls_back(deployed: HostLayersSite) -> None:
    revert = deployed.repo.revert(deployed.commits["r2"], signer=deployed.signer)
    status = deployed.put()
    assert status["appliedRevision"] == revert
    assert deployed.on_host() == ("host r1\n", "tool r1\n")


def test_an_unsigned_commit_is_refused_and_the_merged_revision_kept(
    deployed: HostLayersSite,
) -> None:
    before = deployed.put()["appliedRevision"]
    unsigned = deployed.commit("r3", signed=False)
    status = deployed.put()
    assert status["sourceError"]["reason"] == "UnverifiedCommit", status
    assert status["sourceError"]["revision"] == f"main@sha1:{unsigned}"
    assert status["appliedRevision"] == before
    assert status["phase"] == "Applied"
    assert deployed.on_host() == ("host r1\n", "tool r1\n")


def test_a_tree_systemd_would_not_merge_is_refused_before_merging(
    deployed: HostLayersSite,
) -> None:
    before = deployed.put()["appliedRevision"]
    deployed.repo.write({"sysext/bare/usr/lib/bare/data": "no release file\n"})
    bare = deployed.repo.commit(message="bare", signer=deployed.signer)
    status = deployed.put()
    error = status["sourceError"]
    assert (error["reason"], error["revision"]) == ("InvalidRevision", f"main@sha1:{bare}")
    assert "sysext/bare/usr/lib/extension-release.d/extension-release.bare" in error["message"]
    assert status["appliedRevision"] == before
    assert deployed.on_host() == ("host r1\n", "tool r1\n")
    deployed.repo.remove("sysext/bare")
    deployed.repo.commit(message="drop bare", signer=deployed.signer)


def test_reboot_merges_the_applied_revision_before_tenants_without_shim_or_repo(
    deployed: HostLayersSite,
) -> None:
    host = deployed.host
    host.poweroff()
    # From outside: the merged /etc inside is read-only. No shim at boot, no reachable repo.
    for link in UNIT_LINKS:
        (host.root / link).unlink()
    repo, offline = deployed.repo.bare, deployed.repo.bare.with_name("host.offline")
    repo.rename(offline)
    try:
        host.boot()
    finally:
        offline.rename(repo)
    assert not shim_active(host)
    assert deployed.on_host() == ("host r1\n", "tool r1\n")

    def timestamp(unit: str, prop: str) -> int:
        return int(host.enter("systemctl", "show", "-p", prop, "--value", unit).stdout)

    merged_at = timestamp("bitbuilder-host-layers.service", "ActiveEnterTimestampMonotonic")
    tenant_unit = f"setup-tenant@{TENANT}.service"
    assert host.enter("systemctl", "is-active", tenant_unit).stdout.strip() == "active"
    assert 0 < merged_at <= timestamp(tenant_unit, "InactiveExitTimestampMonotonic")
    assert not deployed.in_tenant(CONF)
    assert not deployed.in_tenant(TOOL)


def test_delete_unmerges(deployed: HostLayersSite) -> None:
    start_shim(deployed.host)
    assert ok(deployed.host, "DELETE", f"/v1/host/layers/{PROFILE}") == {"deleted": PROFILE}
    assert deployed.host.enter("test", "-e", CONF, check=False).returncode == 1
    assert deployed.host.enter("test", "-e", TOOL, check=False).returncode == 1
    assert call(deployed.host, "GET", f"/v1/host/layers/{PROFILE}").status == 404
