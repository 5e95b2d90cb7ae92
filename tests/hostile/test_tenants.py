"""A hostile tenant against the host and its neighbour, end to end: its repo is fetched and
checked out by the real git source, its machine started by the real runner.

Symlinks in the repo's extension trees are valid inside the machine and are resolved only
there; nothing of the host or of another tenant is reachable through them, through pids, or
by re-addressing the machine's own link.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from bitbuilder.hostshim.api import ImageSpec, MachineSpec
from bitbuilder.hostshim.config import ShimConfig
from bitbuilder.hostshim.errors import LayoutError
from bitbuilder.hostshim.machine import executor as executor_module
from bitbuilder.hostshim.machine.layers import machine_layers
from bitbuilder.hostshim.machine.runner import RunningMachine
from bitbuilder.hostshim.paths import TenantPaths
from bitbuilder.hostshim.source.git import Checkout, GitSource
from tests.helpers.gitserve import Link, TenantRepo
from tests.helpers.treesnap import tree_snapshot
from tests.helpers.wait import wait_for
from tests.runner.conftest import Shim, needs_nspawn, unique_name

pytestmark = [pytest.mark.nspawn, pytest.mark.hostile, needs_nspawn]

SECRET = "TOPSECRET-host-only"
NEIGHBOUR = "neighbour-private-data"


def hostile_checkout(
    shim: Shim, name: str, served: Path, links: dict[str, str], files: dict[str, str] | None = None
) -> Checkout:
    """`links` (path in the repo -> target) and `files` committed and synced by the real
    GitSource."""
    repo = TenantRepo(served, f"{name}.git")
    repo.commit(
        {
            "confext/base/etc/motd": "hostile\n",
            **(files or {}),
            **{rel: Link(t) for rel, t in links.items()},
        }
    )
    config = ShimConfig(
        state_dir=shim.config.state_dir,
        runtime_dir=shim.config.runtime_dir,
        file_source_roots=(served,),
    )
    spec = MachineSpec.model_validate(
        {
            "name": name,
            "image": "busybox",
            "source": {"url": repo.file_url(), "ref": {"branch": "main"}},
        }
    )
    return GitSource(TenantPaths(config, name), config).sync(spec)


def cat(shim: Shim, machine: RunningMachine, path: str) -> str:
    result = shim.run_in(machine, "cat", path)
    return result.stdout + result.stderr


def test_symlinks_pids_and_addresses_reach_neither_host_nor_neighbour(
    shim: Shim, tmp_path: Path
) -> None:
    secret = tmp_path / "host-secret"
    secret.write_text(SECRET + "\n")
    neighbour = shim.start()
    assert shim.run_in(neighbour, "sh", "-c", f"echo {NEIGHBOUR} > /root/private").returncode == 0
    neighbour_paths = TenantPaths(shim.config, neighbour.name)
    neighbour_file = neighbour_paths.data / "upper/root/private"
    assert neighbour_file.read_text() == NEIGHBOUR + "\n", "the neighbour's data on the host"

    name = unique_name("evil")
    links = {
        "confext/base/etc/host-secret": str(secret),
        "confext/base/etc/proc-self": f"/proc/self/root{secret}",
        "confext/base/etc/proc-init": f"/proc/1/root{secret}",
        "confext/base/etc/neighbour": str(neighbour_file),
        "confext/base/etc/neighbour-state": str(neighbour_paths.root),
        "confext/base/etc/shadow-link": "/etc/shadow",
        "sysext/tools/usr/lib/escape": "/proc/1/root",
    }
    checkout = hostile_checkout(shim, name, tmp_path / "served", links)
    revision = tree_snapshot(checkout.tree)
    evil = shim.start(name, checkout=checkout)

    assert cat(shim, evil, "/etc/motd") == "hostile\n", "the repo's confext is layered"
    assert shim.run_in(evil, "readlink", "/etc/host-secret").stdout.strip() == str(secret)
    for link in [k.removeprefix("confext/base") for k in links if k.startswith("confext/")]:
        seen = cat(shim, evil, link)
        assert SECRET not in seen and NEIGHBOUR not in seen, (link, seen)
    assert SECRET not in cat(shim, evil, f"/usr/lib/escape{secret}")
    assert shim.run_in(evil, "ls", f"/etc/neighbour-state/{neighbour_paths.data.name}").returncode
    host_shadow = Path("/etc/shadow").read_text()
    assert cat(shim, evil, "/etc/shadow-link") != host_shadow or not host_shadow
    # writing through the links: the layer is read-only and the targets are the machine's own
    for link in ("/etc/host-secret", "/etc/neighbour", "/usr/lib/escape/etc/pwned"):
        assert shim.run_in(evil, "sh", "-c", f"echo pwned > {link}").returncode != 0, link
    # a hard link to a file of the revision's layer, written through: the layer is another
    # (read-only) mount, so the link is refused and the revision tree stays as it was
    hardlink = shim.run_in(evil, "sh", "-c", "ln /etc/motd /root/motd && echo pwned >> /root/motd")
    assert hardlink.returncode != 0, hardlink

    # processes: the neighbour's host pid means nothing inside the tenant's pid namespace
    shim.run_in(evil, "kill", "-9", str(neighbour.leader_pid))
    assert shim.runner.inspect(neighbour.name) == neighbour

    # network: claiming the neighbour's (or its host side's) address reaches nothing either
    assert neighbour.address is not None
    host_of_neighbour = str(ipaddress.IPv4Address(neighbour.address) - 1)
    for claimed, target in [
        (neighbour.address, host_of_neighbour),
        (host_of_neighbour, neighbour.address),
    ]:
        spoof = f"ip addr flush dev host0 && ip addr add {claimed}/30 dev host0"
        assert shim.run_in(evil, "sh", "-c", spoof).returncode == 0
        shim.run_in(evil, "ip", "route", "replace", "default", "dev", "host0")
        ping = shim.run_in(evil, "ping", "-c", "1", "-W", "1", target)
        assert ping.returncode != 0, f"reached {target} as {claimed}"

    shim.runner.stop(evil.name)
    assert secret.read_text() == SECRET + "\n"
    assert neighbour_file.read_text() == NEIGHBOUR + "\n"
    assert not (neighbour_paths.data / "upper/etc/pwned").exists()
    assert tree_snapshot(checkout.tree) == revision, "the revision tree is untouched"
    assert shim.runner.inspect(neighbour.name) == neighbour


# Root in the machine mounts every cgroup hierarchy it can (its cgroup namespace shows its own
# cgroup as the root) and tries to lift its limits or make v1 groups of its own. (It may make
# cgroup2 children: nspawn delegates that subtree, under the limits set above it.)
ESCAPE_LIMITS = r"""
for h in memory pids cpu; do
  mkdir -p /tmp/v1-$h && mount -t cgroup -o $h none /tmp/v1-$h 2>/dev/null
done
mkdir -p /tmp/v2 && mount -t cgroup2 none /tmp/v2 2>/dev/null
for f in /tmp/v1-memory/memory.limit_in_bytes /tmp/v1-pids/pids.max \
         /tmp/v1-cpu/cpu.cfs_quota_us /tmp/v2/memory.max /tmp/v2/pids.max /tmp/v2/cpu.max \
         /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max; do
  [ -e $f ] && (echo max > $f || echo -1 > $f) 2>/dev/null && echo "RAISED $f"
done
for d in /tmp/v1-memory /tmp/v1-pids /tmp/v1-cpu; do
  mkdir $d/escape 2>/dev/null && echo "CREATED $d/escape"
done
echo checked
"""


def test_tenant_cannot_raise_its_own_limits(shim: Shim) -> None:
    machine = shim.start(resources={"memoryBytes": 64 * 2**20, "tasks": 32, "cpuMillis": 500})
    cgroups = shim.executor.cgroups(machine.name)
    assert cgroups is not None
    limits = ("memory.limit_in_bytes", "memory.max", "pids.max", "cpu.cfs_quota_us", "cpu.max")

    def host_limits() -> dict[Path, str]:
        return {
            d / f: (d / f).read_text() for d in cgroups.dirs for f in limits if (d / f).exists()
        }

    before = host_limits()
    assert before, "the machine has limits on the host"
    result = shim.run_in(machine, "sh", "-c", ESCAPE_LIMITS, in_cgroup=True)
    assert result.stdout.splitlines() == ["checked"], result.stdout
    assert host_limits() == before


def test_console_flood_neither_fills_the_runtime_dir_nor_blocks(
    shim: Shim, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(executor_module, "CONSOLE_LOG_BYTES", 64 << 10)
    machine = shim.start()
    log = TenantPaths(shim.config, machine.name).run / "console.log"
    flood = "i=0; while [ $i -lt 4 ]; do cat /bin/busybox > /dev/console; i=$((i+1)); done"
    assert shim.run_in(machine, "sh", "-c", flood, timeout=60).returncode == 0
    wait_for(lambda: log.stat().st_size >= 64 << 10, 20, what="the log filled up")
    assert stat.S_IMODE(log.stat().st_mode) == 0o600, "the console log is private"
    assert shim.runner.inspect(machine.name) == machine, "the machine runs on"
    echo = shim.run_in(machine, "sh", "-c", "echo still-talking > /dev/console", timeout=10)
    assert echo.returncode == 0, "its console is still read"
    shim.runner.stop(machine.name)  # all it printed has passed the reader now
    assert log.stat().st_size == 64 << 10, "the first bytes are kept, the rest dropped"


def test_device_nodes_in_the_image_open_no_host_device(shim: Shim, busybox_rootfs: Path) -> None:
    """A directory image keeps device nodes (cp -a); inside the machine they open nothing."""
    copy = busybox_rootfs.parent / unique_name("devimg")
    try:
        subprocess.run(["cp", "-a", str(busybox_rootfs), str(copy)], check=True)
        os.mknod(copy / "root/zero", 0o666 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero
        shim.images.put("devimg", ImageSpec(path=str(copy)))
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    machine = shim.start(image="devimg")
    assert "zero" in shim.run_in(machine, "ls", "/root").stdout
    opened = shim.run_in(machine, "head", "-c", "1", "/root/zero")
    assert opened.returncode != 0 and "ermission denied" in opened.stderr, opened
    assert shim.run_in(machine, "head", "-c", "1", "/dev/zero").returncode == 0, "its own /dev"


def test_writes_in_a_machine_never_reach_the_shared_image(shim: Shim) -> None:
    """Every tenant of an image shares its rootfs: a machine's root writes into its own
    layer only, whatever it changes, replaces, chmods or deletes."""
    rootfs = shim.images.rootfs("busybox")
    before = tree_snapshot(rootfs)
    vandal = shim.start()
    script = (
        "ln /etc/group /root/hardlink && echo pwned >> /root/hardlink && "
        "echo pwned > /etc/inittab && chmod 777 /etc && rm /etc/passwd && "
        "mkdir -p /usr/new && chown -R 1:1 /usr/new /bin && ln -sf /proc/1/root/etc /etc/link"
    )
    vandalised = shim.run_in(vandal, "sh", "-c", script)
    assert vandalised.returncode == 0, vandalised.stderr
    neighbour = shim.start()
    assert "pwned" not in shim.run_in(neighbour, "cat", "/etc/inittab").stdout
    assert shim.run_in(neighbour, "cat", "/etc/passwd").returncode == 0
    shim.runner.stop(vandal.name)
    assert tree_snapshot(rootfs) == before, "the image is untouched"


def test_device_nodes_made_in_a_machine_open_no_host_device(shim: Shim) -> None:
    """Root in the machine has no CAP_MKNOD over host devices (its user namespace), and its
    writable layer is mounted nodev on the host too."""
    machine = shim.start()
    made = shim.run_in(machine, "sh", "-c", "mknod /root/mem c 1 1 && head -c 1 /root/mem")
    assert made.returncode != 0, made
    data = TenantPaths(shim.config, machine.name).data
    assert "nodev" in mount_options(data), "the tenant's disk is mounted nodev"
    assert shim.run_in(machine, "head", "-c", "1", "/dev/zero").returncode == 0, "its own /dev"


def mount_options(path: Path) -> str:
    found = subprocess.run(
        ["findmnt", "-n", "-o", "OPTIONS", "--mountpoint", str(path)],
        capture_output=True,
        text=True,
    )
    return found.stdout.strip()


HOSTILE_UNIT = """[Unit]
Description=tries the host
[Service]
ExecStart=/bin/sh -c 'echo pwned > /proc/1/root/etc/pwned'
[Install]
WantedBy=../../../../../../tmp/escape.target multi-user.target
"""


def test_repo_units_reach_only_the_machines_own_etc(shim: Shim, tmp_path: Path) -> None:
    """A unit linked to a host file is refused at checkout; a regular one is copied into the
    machine's own units layer, its WantedBy= targets only as plain names, never the host's."""
    with pytest.raises(LayoutError, match=r"units/evil\.service"):
        hostile_checkout(
            shim, unique_name("units"), tmp_path / "a", {"units/evil.service": "/etc/shadow"}
        )
    host_units = sorted(os.listdir("/etc/systemd/system"))
    checkout = hostile_checkout(
        shim, unique_name("units"), tmp_path / "b", {}, {"units/web.service": HOSTILE_UNIT}
    )
    run_dir = tmp_path / "run"
    etc_layers, _ = machine_layers(run_dir, checkout.layout, with_units=True)
    layer = etc_layers[0]
    assert layer.is_relative_to(run_dir)
    wants = sorted(p.name for p in (layer / "systemd/system").iterdir())
    assert wants == ["multi-user.target.wants", "web.service"], wants
    assert not list(tmp_path.rglob("escape.target*")) and not Path("/tmp/escape.target").exists()
    assert sorted(os.listdir("/etc/systemd/system")) == host_units, "the host's units untouched"
