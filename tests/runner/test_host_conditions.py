"""Conditions a host can be in, each refused with the host setting at fault and what to change
(a HostError with its own reason), never an InternalError: a read-only or missing cgroup file
system, a missing controller, a read-only /proc/sys, no nftables, no user namespaces.

Each is simulated by pointing the code at a read-only or missing path (a tmpfs the test mounts),
a PATH without nft, or a mount namespace where /proc/sys is read-only.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bitbuilder.hostshim.api import MachineSpec, NetworkSpec, ResourceLimits
from bitbuilder.hostshim.errors import HostError
from bitbuilder.hostshim.machine import cgroups, network
from bitbuilder.hostshim.machine.runner import check_spec
from bitbuilder.hostshim.machine.runtime import nspawn
from tests.helpers.hostfs import mounted_tmpfs, remount_readonly
from tests.helpers.needs import needs_root_and
from tests.runner.conftest import unique_name


def fake_cgroup_root(root: Path, controllers: str) -> Path:
    """What create_cgroups looks for: a cgroup2 root (cgroup.procs, cgroup.controllers)."""
    (root / "cgroup.procs").write_text("")
    (root / "cgroup.controllers").write_text(controllers)
    return root


@needs_root_and("mount")
def test_read_only_cgroups_name_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with mounted_tmpfs(tmp_path / "cgroup") as root:
        fake_cgroup_root(root, "memory pids")
        remount_readonly(root)
        monkeypatch.setattr(cgroups, "CGROUP_ROOT", root)
        with pytest.raises(HostError) as refused:
            cgroups.create_cgroups("test", "web", ResourceLimits())
    assert refused.value.reason == "CgroupsReadOnly"
    assert str(root / "bitbuilder-test") in refused.value.message
    assert "delegates a writable cgroup tree" in refused.value.message
    assert refused.value.status == 503


def test_missing_cgroups_name_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", tmp_path)
    with pytest.raises(HostError) as refused:
        cgroups.create_cgroups("test", "web", ResourceLimits())
    assert refused.value.reason == "CgroupsMissing"
    assert f"mount -t cgroup2 none {tmp_path}" in refused.value.message


@needs_root_and("ip")
def test_no_nftables_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "ip").symlink_to(shutil.which("ip") or "/sbin/ip")
    monkeypatch.setenv("PATH", str(tools))
    name = unique_name("nonft")
    with pytest.raises(HostError) as refused:
        network.prepare_link("test", name, NetworkSpec())
    assert refused.value.reason == "NftablesMissing"
    assert "install the nftables package" in refused.value.message
    assert not network._reservations_of(network.link_name("test", name)), "no reservation kept"


# Run in a mount namespace where /proc/sys is read-only (as in a container sharing the host's
# network), against a network namespace the test makes: the host's own is never touched.
_READ_ONLY_PROC_SYS = (
    'mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && exec "$@"'
)
_SET = """
import sys
from bitbuilder.hostshim.errors import HostError
from bitbuilder.hostshim.machine.network import Link, configure_inside
try:
    configure_inside(Link("bbx", "host0", "10.9.0.1/30", "10.9.0.2/30"), int(sys.argv[1]))
except HostError as exc:
    print(exc.reason, exc.message)
"""


@needs_root_and("unshare", "nsenter", "sysctl", "mount")
def test_read_only_proc_sys_names_the_setting() -> None:
    netns = subprocess.Popen(["unshare", "--net", "sleep", "600"])
    try:
        result = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", _READ_ONLY_PROC_SYS,
             "sh", sys.executable, "-c", _SET, str(netns.pid)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        netns.kill()
        netns.wait()
    assert result.stdout.startswith("SysctlDenied "), (result.stdout, result.stderr)
    assert "net.ipv6.conf.all.disable_ipv6" in result.stdout
    assert "/proc/sys is not writable where the shim runs" in result.stdout


def spec() -> MachineSpec:
    return MachineSpec.model_validate({"name": "web", "image": "busybox"})


@pytest.mark.parametrize(("content", "fix"), [("0\n", "sysctl -w"), (None, "CONFIG_USER_NS")])
def test_no_user_namespaces_refused_before_anything_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str | None, fix: str
) -> None:
    limit = tmp_path / "max_user_namespaces"
    if content is not None:
        limit.write_text(content)
    monkeypatch.setattr(nspawn, "MAX_USER_NAMESPACES", limit)
    with pytest.raises(HostError) as refused:
        check_spec(spec())  # what the manager asks before it stops a running machine
    assert refused.value.reason == "UserNamespacesDisabled"
    assert fix in refused.value.message
