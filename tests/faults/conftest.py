"""Fault injection on real parts: the shim as its own process (`bitbuilder-hostshim`, direct
executor, killed with SIGKILL where a case says so), tenant repos served by `git daemon` on
loopback, real nspawn machines from the busybox image.

Every case ends by deleting its tenants through the shim and stopping it; the fixture then
checks that nothing of theirs is left on the host (processes, mounts, cgroups, links, nftables
elements) before it force-cleans whatever a failed case left, so the next case starts clean.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from bitbuilder.hostshim.config import ShimConfig
from bitbuilder.hostshim.machine.executor import shim_scope
from bitbuilder.hostshim.machine.network import filter_entries, link_name
from bitbuilder.hostshim.paths import TenantPaths
from tests.helpers.gitserve import Content, Server, TenantRepo, git_daemon
from tests.helpers.needs import needs_root_and
from tests.helpers.wait import wait_for
from tests.shim.conftest import RealShim, real_config
from tests.shim.harness import Reply, ShimClient, daemon_argv
from tests.standalone.conftest import host  # noqa: F401  (`bitbuilder run` cases use it)

# Each test module sets `pytestmark = FAULTS` (a conftest's pytestmark marks nothing).
FAULTS = [pytest.mark.faults, pytest.mark.nspawn, needs_root_and("systemd-nspawn", "nft", "git")]
MARKER = "var/fault-marker"  # a file a case writes in a machine: its writable data


def motd(text: str) -> dict[str, Content]:
    return {"confext/motd/etc/motd": f"{text}\n"}


class FaultHost:
    """One case's host: the shim process, the git server and repos, the tenants it PUT."""

    def __init__(self, root: Path, git: Server, rootfs: Path, **config: Any) -> None:
        self.root = root
        self.git = git
        self.config: ShimConfig = real_config(root, trusted_image_paths=(rootfs.parent,), **config)
        self.rootfs = rootfs
        self.client = ShimClient(str(self.config.socket_path), timeout=120)
        self.log = root / "shim.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.repos: dict[str, TenantRepo] = {}
        self.names: set[str] = set()  # every tenant ever PUT: what the leftover check covers

    # --- the shim process -------------------------------------------------------------------

    def start_shim(self, drift_interval: float = 0) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                daemon_argv(self.config, drift_interval), stdout=out, stderr=subprocess.STDOUT
            )
        proc = self.proc
        wait_for(lambda: proc.poll() is not None or self.resumed(), 60, what="the shim to resume")
        assert proc.poll() is None, self.log.read_text()[-3000:]
        reply = self.client.request("PUT", "/v1/images/busybox", {"path": str(self.rootfs)})
        assert reply.status == 200, reply.body

    def resumed(self) -> bool:
        try:
            return bool(self.client.request("GET", "/healthz").body["resumed"])
        except OSError:
            return False

    def kill_shim(self) -> None:
        """kill -9: no handler runs, nothing is flushed or cleaned up."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.proc = None

    def stop_shim(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            assert self.proc.wait(60) == 0, self.log.read_text()[-3000:]
            self.proc = None

    # --- tenants ----------------------------------------------------------------------------

    def repo(self, name: str, text: str | None = None) -> TenantRepo:
        repo = TenantRepo(self.git.base, f"{name}.git")
        repo.commit(motd(text or f"{name} v1"), "first")
        self.repos[name] = repo
        return repo

    def spec(self, name: str, **overrides: Any) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "name": name,
            "image": "busybox",
            "source": {"url": self.git.url(f"{name}.git"), "ref": {"branch": "main"}},
            "resources": {"memoryBytes": 64 << 20, "tasks": 64},
        }
        spec.update(overrides)
        return spec

    def put(self, name: str, **overrides: Any) -> Reply:
        self.names.add(name)
        return self.client.put(self.spec(name, **overrides))

    def running(self, name: str, **overrides: Any) -> dict[str, Any]:
        """PUT the tenant and insist it runs; its status."""
        reply = self.put(name, **overrides)
        assert reply.status == 200 and reply.body["phase"] == "Running", reply.body
        body: dict[str, Any] = reply.body
        return body

    def status(self, name: str) -> dict[str, Any]:
        reply = self.client.get(name)
        assert reply.status == 200, reply.body
        body: dict[str, Any] = reply.body
        return body

    def paths(self, name: str) -> TenantPaths:
        return TenantPaths(self.config, name)

    def in_machine(self, leader: int, rel: str) -> Path:
        return Path(f"/proc/{leader}/root") / rel

    def nspawns(self, name: str) -> list[int]:
        return nspawns(self.config, name)

    def one_machine(self, name: str) -> None:
        one_machine(self.config, name)

    # --- teardown ---------------------------------------------------------------------------

    def delete_all(self) -> None:
        """Delete every tenant through the shim (started if a case left it down)."""
        if self.proc is None:
            self.start_shim()
        with ThreadPoolExecutor(max_workers=8) as pool:  # a busybox poweroff takes ~2 s
            replies = dict(zip(self.names, pool.map(self.delete, self.names), strict=True))
        assert all(r.status in (200, 404) for r in replies.values()), replies
        self.stop_shim()

    def delete(self, name: str) -> Reply:
        return self.client.delete(name, keep_data=False)

    def leftovers(self) -> list[str]:
        """What the tenants' runs left on the host (the shim itself aside)."""
        shim = self.proc.pid if self.proc is not None else None
        return leftovers(self.config, self.root, self.names, shim)

    def force_clean(self) -> None:
        """Whatever a failed case left: the shim, then every machine of these dirs."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(30)
            self.proc = None
        RealShim(self.config).stop_all()


def leftovers(
    config: ShimConfig, root: Path, names: Collection[str], shim: int | None = None
) -> list[str]:
    """What machines of the shim over `config` left on the host: processes naming its dirs
    (but the shim's own), mounts under `root`, its cgroups, and the links and nftables elements
    of the tenants `names`."""
    found = []
    marks = (str(config.runtime_dir), str(config.state_dir))
    found += [f"process {pid}: {argv}" for pid, argv in host_processes()
              if pid != shim and any(m in argv for m in marks)]  # fmt: skip
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if point.startswith(str(root)):
            found.append(f"mount {point}")
    scope = shim_scope(config)
    for depth in range(1, 6):
        pattern = "/sys/fs/cgroup/" + "*/" * depth + f"bitbuilder-{scope}"
        found += [f"cgroup {d}" for d in glob.glob(pattern)]
    for name in sorted(names):
        ifname = link_name(scope, name)
        if Path(f"/sys/class/net/{ifname}").exists():
            found.append(f"link {ifname} ({name})")
        found += [f"nftables: {entry} ({name})" for entry in filter_entries(ifname)]
    return found


def nspawns(config: ShimConfig, name: str) -> list[int]:
    """Host pids of nspawn processes running this tenant's root."""
    root = str(TenantPaths(config, name).run / "root")
    return [pid for pid, argv in host_processes() if "systemd-nspawn" in argv and root in argv]


def one_machine(config: ShimConfig, name: str) -> None:
    """Exactly one nspawn runs the tenant (one more is nspawn's own child while it starts)."""
    wait_for(lambda: len(nspawns(config, name)) == 1, 15, what=f"{name}: exactly one machine")


def host_processes() -> list[tuple[int, str]]:
    """(pid, command line) of every live process on the host."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes()
        except OSError:
            continue
        if argv:  # empty: a zombie or a kernel thread
            found.append((int(entry.name), argv.replace(b"\0", b" ").decode(errors="replace")))
    return found


@contextmanager
def serving(root: Path, rootfs: Path, **config: Any) -> Iterator[FaultHost]:
    """A FaultHost under `root` with its shim serving; its tenants deleted and checked after."""
    served = root / "served"  # under the shim's file-source root, exported by git daemon
    served.mkdir()
    with git_daemon(served) as server:
        made = FaultHost(root, server, rootfs, **config)
        try:
            made.start_shim()
            yield made
            made.delete_all()
            left = made.leftovers()
            assert not left, f"left behind: {left}"
        finally:
            made.force_clean()


@pytest.fixture
def fault_host(tmp_path: Path, busybox_rootfs: Path) -> Iterator[FaultHost]:
    with serving(tmp_path, busybox_rootfs) as made:
        yield made
