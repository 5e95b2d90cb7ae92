"""Real busybox machines under systemd-nspawn: service, layers, isolation, limits, cleanup."""

from __future__ import annotations

import ipaddress
import os
import random
import re
import socket
import subprocess
import urllib.request
import uuid
from pathlib import Path

import pytest

from bitbuilder.hostshim.api import ImageSpec
from bitbuilder.hostshim.errors import ImageError, MachineError
from bitbuilder.hostshim.machine.executor import shim_scope
from bitbuilder.hostshim.machine.network import filter_entries, link_name
from bitbuilder.hostshim.machine.runner import RunningMachine
from bitbuilder.hostshim.paths import TenantPaths
from bitbuilder.hostshim.source.git import Checkout
from bitbuilder.hostshim.source.layout import Layout, RepoSettings
from tests.helpers.treesnap import tree_snapshot
from tests.helpers.wait import wait_for
from tests.runner.conftest import Shim, assert_gone, needs_nspawn, unique_name

pytestmark = [pytest.mark.nspawn, needs_nspawn]


def http_get(address: str | None, port: int = 8080) -> str | None:
    try:
        with urllib.request.urlopen(f"http://{address}:{port}/", timeout=2) as response:
            return response.read().decode()  # type: ignore[no-any-return]
    except OSError:
        return None


def host_side(machine: RunningMachine) -> str:
    assert machine.address is not None
    return str(ipaddress.IPv4Address(machine.address) - 1)


def write_tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_service_runs_and_stop_removes_everything(shim: Shim) -> None:
    machine = shim.start()
    assert os.readlink(f"/proc/{machine.leader_pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
    assert Path(f"/proc/{machine.leader_pid}/cmdline").read_bytes().startswith(b"init")
    assert wait_for(lambda: http_get(machine.address), what="httpd") == "bitbuilder busybox image\n"
    assert shim.runner.inspect(machine.name) == machine
    processes = shim.run_in(machine, "ps", "-o", "pid,args").stdout
    assert "httpd -f -p 8080" in processes
    left = shim.leftovers(machine.name)
    assert left.pids and os.path.ismount(left.root_mount)

    shim.runner.stop(machine.name)
    assert_gone(left)
    assert shim.runner.inspect(machine.name) is None
    assert TenantPaths(shim.config, machine.name).data.is_dir(), "stop keeps the data"
    shim.runner.stop(machine.name)  # idempotent


def test_extension_trees_are_layered_read_only(shim: Shim, tmp_path: Path) -> None:
    marker = f"bitbuilder-greeting-{uuid.uuid4().hex[:8]}"
    tree = tmp_path / "revision"
    write_tree(
        tree,
        {
            f"confext/base/etc/{marker}": "hello from confext\n",
            "sysext/tools/usr/share/bbtools/tool": "from sysext\n",
        },
    )
    layout = Layout(
        root=tree,
        sysext={"tools": tree / "sysext/tools"},
        confext={"base": tree / "confext/base"},
        units={},
        settings=RepoSettings(hostname="web-1", environment={"GREETING": "hi there"}),
    )
    checkout = Checkout(commit="a" * 40, ref="main", tree=tree, layout=layout)
    before = tree_snapshot(tree)
    machine = shim.start(checkout=checkout, repoSettings=["hostname", "environment"])

    assert machine.revision == f"main@sha1:{'a' * 40}"
    assert shim.run_in(machine, "cat", f"/etc/{marker}").stdout == "hello from confext\n"
    assert shim.run_in(machine, "cat", "/usr/share/bbtools/tool").stdout == "from sysext\n"
    owners = shim.run_in(
        machine, "stat", "-c", "%u:%g", f"/etc/{marker}", "/usr/share/bbtools/tool"
    )
    assert owners.stdout.split() == ["0:0", "0:0"], "the repo's files are the machine root's"
    assert "respawn" in shim.run_in(machine, "cat", "/etc/inittab").stdout, "image /etc kept"
    assert "busybox" in shim.run_in(machine, "ls", "/usr/bin/wget", "-l").stdout
    overwrite = shim.run_in(machine, "sh", "-c", f"echo x > /etc/{marker}")
    assert overwrite.returncode != 0 and "Read-only" in overwrite.stderr
    assert shim.run_in(machine, "touch", "/usr/share/bbtools/new").returncode != 0
    assert not Path("/etc", marker).exists(), "the host's /etc is untouched"
    assert shim.run_in(machine, "hostname").stdout.strip() == "web-1"
    environ = Path(f"/proc/{machine.leader_pid}/environ").read_bytes().split(b"\0")
    assert b"GREETING=hi there" in environ
    shim.runner.stop(machine.name)
    assert tree_snapshot(tree) == before, "nothing ever writes into the revision tree"


def test_repo_settings_only_where_the_spec_allows(shim: Shim, tmp_path: Path) -> None:
    layout = Layout(tmp_path, {}, {}, {}, RepoSettings(hostname="web-1", environment={"A": "b"}))
    machine = shim.start(checkout=Checkout("b" * 40, "main", tmp_path, layout))
    assert shim.run_in(machine, "hostname").stdout.strip() == machine.name
    assert b"A=b" not in Path(f"/proc/{machine.leader_pid}/environ").read_bytes().split(b"\0")


def test_tenants_cannot_see_each_other(shim: Shim) -> None:
    a, b = shim.start(), shim.start()
    wait_for(lambda: http_get(b.address), what="b's httpd")
    # processes: a long sleep with a recognisable argument runs in b only
    started = shim.run_in(b, "sh", "-c", "sleep 4321 >/dev/null 2>&1 &", in_cgroup=True)
    assert started.returncode == 0
    assert "sleep 4321" in shim.run_in(b, "ps", "-o", "args").stdout
    assert "sleep 4321" not in shim.run_in(a, "ps", "-o", "args").stdout
    assert len(shim.run_in(a, "ps", "-o", "pid").stdout.split()) <= 5  # header, init, httpd, ps
    # files: b's writes are not in a; neither tenant sees the shim's state dir
    assert shim.run_in(b, "sh", "-c", "echo b > /root/marker-b").returncode == 0
    assert shim.run_in(b, "cat", "/root/marker-b").stdout == "b\n"
    assert shim.run_in(a, "cat", "/root/marker-b").returncode != 0
    assert shim.run_in(a, "ls", str(shim.config.state_dir)).returncode != 0
    # network: nothing of b is reachable from a, even with a route a's root adds itself
    assert shim.run_in(a, "ip", "route", "add", "default", "via", host_side(a)).returncode == 0
    for target in (b.address or "", host_side(b), host_side(a)):
        ping = shim.run_in(a, "ping", "-c", "1", "-W", "1", target)
        assert ping.returncode != 0, f"a reached {target}"
    assert shim.run_in(a, "nc", "-w", "1", b.address or "", "8080").returncode != 0
    assert http_get(b.address) is not None, "b itself still serves the host"


def test_allow_host_reaches_only_the_hosts_link_address(shim: Shim) -> None:
    machine = shim.start(network={"allowHost": True})
    assert shim.run_in(machine, "ping", "-c", "1", "-W", "2", host_side(machine)).returncode == 0
    shim.run_in(machine, "ip", "route", "add", "default", "via", host_side(machine))
    other = shim.start()
    assert shim.run_in(machine, "ping", "-c", "1", "-W", "1", host_side(other)).returncode != 0


def test_network_none_has_loopback_only(shim: Shim) -> None:
    machine = shim.start(network={"mode": "none"})
    assert machine.address is None
    links = shim.run_in(machine, "ip", "-o", "link").stdout.splitlines()
    assert [line.split(":")[1].strip() for line in links] == ["lo"]


def test_memory_limit_kills_the_offender(shim: Shim) -> None:
    machine = shim.start(resources={"memoryBytes": 32 * 2**20})
    small = shim.run_in(machine, "dd", "if=/dev/zero", "of=/dev/null", "bs=4M", "count=1",
                        in_cgroup=True)  # fmt: skip
    assert small.returncode == 0, small.stderr
    big = shim.run_in(machine, "dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1",
                      in_cgroup=True)  # fmt: skip
    assert big.returncode in (-9, 137), f"not killed: {big.returncode} {big.stderr}"
    cgroups = shim.executor.cgroups(machine.name)
    assert cgroups is not None
    # v1: memory.oom_control, v2: memory.events; both count "oom_kill N"
    counters = [d / f for d in cgroups.dirs for f in ("memory.oom_control", "memory.events")]
    kills = [re.search(r"^oom_kill (\d+)", p.read_text(), re.M) for p in counters if p.exists()]
    assert any(k and int(k.group(1)) > 0 for k in kills), "no OOM kill counted"
    assert shim.runner.inspect(machine.name) is not None, "the machine itself lives on"


def test_pids_limit_is_enforced(shim: Shim) -> None:
    machine = shim.start(resources={"tasks": 16})
    script = "i=0; while [ $i -lt 40 ]; do sleep 300 >/dev/null 2>&1 & i=$((i+1)); done; echo done"
    forks = shim.run_in(machine, "sh", "-c", script, in_cgroup=True)
    assert "fork" in forks.stderr, forks.stderr
    cgroups = shim.executor.cgroups(machine.name)
    assert cgroups is not None
    assert len(cgroups.pids()) <= 16


def test_cpu_limit_is_written(shim: Shim) -> None:
    machine = shim.start(resources={"cpuMillis": 250})
    cgroups = shim.executor.cgroups(machine.name)
    assert cgroups is not None
    quotas = [d / name for d in cgroups.dirs for name in ("cpu.max", "cpu.cfs_quota_us")]
    assert {p.read_text().split()[0] for p in quotas if p.exists()} == {"25000"}


def test_failed_start_leaves_nothing(shim: Shim, tmp_path: Path) -> None:
    with pytest.raises(ImageError) as missing:
        shim.start(image="no-such-image")
    assert missing.value.reason == "ImageNotFound"
    bad = Layout(tmp_path, {}, {}, {}, RepoSettings(environment={"SYSTEMD_X": "1"}))
    name = unique_name()
    with pytest.raises(MachineError, match="SYSTEMD_X"):
        shim.start(name, checkout=Checkout("c" * 40, "main", tmp_path, bad),
                   repoSettings=["environment"])  # fmt: skip
    run = TenantPaths(shim.config, name).run
    assert not os.path.ismount(run / "root")
    assert shim.executor.pid(name) is None
    assert not filter_entries(link_name(shim_scope(shim.config), name))
    assert not Path("/sys/class/net", link_name(shim_scope(shim.config), name)).exists()
    assert shim.runner.adopt() == {}


def test_start_twice_is_refused(shim: Shim) -> None:
    machine = shim.start()
    with pytest.raises(MachineError) as again:
        shim.start(machine.name)
    assert again.value.reason == "AlreadyRunning"
    assert shim.runner.inspect(machine.name) == machine


def free_host_port(shim: Shim) -> int:
    """A port in the shim's host port range that nothing on this host listens on."""
    low, high = shim.config.host_port_range
    for port in random.sample(range(low, high + 1), 200):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port in {low}-{high}")


def test_port_forward_from_host_loopback(shim: Shim) -> None:
    port = free_host_port(shim)
    machine = shim.start(network={"ports": [{"port": 8080, "hostPort": port}]})
    assert wait_for(lambda: http_get("127.0.0.1", port), what="forwarded port") == (
        "bitbuilder busybox image\n"
    )
    with pytest.raises(MachineError) as taken:
        shim.start(network={"ports": [{"port": 80, "hostPort": port}]})
    assert taken.value.reason == "PortInUse"
    shim.runner.stop(machine.name)
    assert http_get("127.0.0.1", port) is None, "forward removed with the machine"


def test_image_in_use_is_not_replaced(shim: Shim, busybox_rootfs: Path) -> None:
    machine = shim.start()
    before = shim.images.get("busybox")
    with pytest.raises(ImageError) as in_use:
        shim.images.put("busybox", ImageSpec(path=f"{busybox_rootfs}/."))  # another spec
    assert in_use.value.reason == "ImageInUse"
    assert shim.images.get("busybox") == before
    assert shim.run_in(machine, "cat", "/etc/inittab").returncode == 0
    shim.runner.stop(machine.name)
    assert shim.images.put("busybox", ImageSpec(path=f"{busybox_rootfs}/.")) != before


def test_stop_never_deletes_through_a_mount_left_below_the_run_dir(
    shim: Shim, tmp_path: Path
) -> None:
    """An unmount that failed must not turn cleanup into deleting the mounted files."""
    name = unique_name()
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep").write_text("data")
    run = TenantPaths(shim.config, name).run
    mountpoint = run / "root" / "x"
    mountpoint.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(precious), str(mountpoint)], check=True)
    try:
        with pytest.raises(MachineError) as error:
            shim.runner.stop(name)
        assert error.value.reason == "MountBusy"
        assert (precious / "keep").read_text() == "data"
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
    shim.runner.stop(name)  # the mount gone, stop clears the run dir as usual
    assert not (run / "root").exists()
