"""Standalone mode on real parts: the real host shim (a `bitbuilder-hostshim` process, direct
executor, real nspawn machines from the busybox image), tenant and fleet repos served by
`git daemon` on loopback, and `bitbuilder run` as a process. Every process, machine and repo
is removed by the fixture, even when the test fails."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bitbuilder.hostshim.api import ImageSpec, MachinePhase, MachineStatus
from bitbuilder.operator.demohost import Processes, free_port, wait_port
from bitbuilder.operator.localstate import LocalState
from bitbuilder.operator.shimclient import ShimClient
from bitbuilder.operator.status import find_condition
from tests.helpers.gitserve import Content, Server, TenantRepo, git_daemon
from tests.helpers.needs import needs_root_and
from tests.helpers.wait import wait_for

# Each test module sets `pytestmark = REAL_HOST` (a conftest's pytestmark marks nothing).
REAL_HOST = [pytest.mark.nspawn, needs_root_and("systemd-nspawn", "git")]
BIN = Path(sys.executable).parent
WEBHOOK_SECRET = b"standalone-test-webhook-secret"


def tenant_manifest(name: str, url: str, interval: str = "1s", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "image": {"name": "busybox"},
        "source": {"url": url, "ref": {"branch": "main"}, "interval": interval},
        "resources": {"memory": "64Mi", "tasks": 64},
    }
    body.update(spec)
    return {
        "apiVersion": "bitbuilder.io/v1alpha1",
        "kind": "Tenant",
        "metadata": {"name": name},
        "spec": body,
    }


def motd(text: str) -> dict[str, Content]:
    return {"confext/motd/etc/motd": f"{text}\n"}


class Host:
    """One test's host: shim, git server, repos, the reconciler and its state."""

    def __init__(self, root: Path, git: Server, rootfs: Path) -> None:
        self.root = root
        self.git = git
        self.procs = Processes(root / "logs")
        self.socket = root / "run" / "hostshim.sock"
        self.state = LocalState(root / "standalone")
        self.fleet = TenantRepo(git.base, "fleet.git")
        self.repos: dict[str, TenantRepo] = {}
        self.webhook_port = 0
        images = root / "images"
        images.mkdir()
        shutil.copytree(rootfs, images / "busybox", symlinks=True)

    # --- shim ---------------------------------------------------------------------------------

    def start_shim(self, *flags: str, netns: str | None = None) -> None:
        """`netns`: run the shim (and so its machines and their links) in that network
        namespace; its repos must then be file:// ones (git daemon listens on this loopback)."""
        # nsenter, not `ip netns exec`: that one remounts /sys, hiding the cgroup file systems.
        inside = ["nsenter", f"--net=/run/netns/{netns}"] if netns else []
        self.procs.start(
            "hostshim",
            [*inside, str(BIN / "bitbuilder-hostshim"), "--state-dir", str(self.root / "shim"),
             "--runtime-dir", str(self.root / "run"), "--socket", str(self.socket),
             "--trusted-image-path", str(self.root / "images"), "--executor", "direct",
             "--drift-interval", "0", "--allow-source-network", "127.0.0.1/32", *flags],
        )  # fmt: skip
        wait_for(lambda: self.call(lambda c: c.healthy()), timeout=30, what="the shim")
        self.call(
            lambda c: c.put_image("busybox", ImageSpec(path=str(self.root / "images/busybox")))
        )

    def call(self, fn: Any) -> Any:
        async def main() -> Any:
            async with ShimClient(self.socket, timeout=10) as client:
                return await fn(client)

        return asyncio.run(main())

    def machine(self, name: str) -> MachineStatus | None:
        result: MachineStatus | None = self.call(lambda c: c.get(name))
        return result

    def motd(self, name: str) -> str:
        m = self.machine(name)
        if m is None or m.phase is not MachinePhase.running or m.leader_pid is None:
            return ""
        return (Path(f"/proc/{m.leader_pid}/root/etc/motd")).read_text().strip()

    # --- repos --------------------------------------------------------------------------------

    def tenant_repo(self, name: str, text: str) -> TenantRepo:
        repo = TenantRepo(self.git.base, f"{name}.git")
        repo.commit(motd(text), "first")
        self.repos[name] = repo
        return repo

    def url(self, name: str) -> str:
        return self.git.url(f"{name}.git")

    def commit_fleet(self, files: dict[str, Any], remove: tuple[str, ...] = ()) -> str:
        if remove:
            self.fleet.remove(*remove)
        rendered: dict[str, Content] = {
            path: doc
            if isinstance(doc, str)
            else yaml.safe_dump_all(doc if isinstance(doc, list) else [doc])
            for path, doc in files.items()
        }
        return self.fleet.commit(rendered, "fleet change")

    # --- the reconciler -----------------------------------------------------------------------

    def start_reconciler(self, webhook: bool = False, secrets: Path | None = None) -> None:
        argv = [str(BIN / "bitbuilder"), "run", "--fleet", self.url("fleet"), "--fleet-interval",
                "500ms", "--socket", str(self.socket), "--state-dir", str(self.state.root)]  # fmt: skip
        if secrets is not None:
            argv += ["--secrets-dir", str(secrets)]
        if webhook:
            secret = self.root / "webhook.secret"
            secret.write_bytes(WEBHOOK_SECRET)
            self.webhook_port = free_port()
            argv += ["--webhook-listen", f"127.0.0.1:{self.webhook_port}",
                     "--webhook-secret-file", str(secret)]  # fmt: skip
        proc = self.procs.start("reconciler", argv)
        if webhook:
            wait_port(self.webhook_port, proc)

    def condition(self, name: str, type_: str) -> tuple[str, str, str] | None:
        record = self.state.load(name)
        cond = find_condition(record.status if record else None, type_)
        return None if cond is None else (cond.status, cond.reason, cond.message)

    def reconciler_log(self) -> str:
        return (self.procs.logs / "reconciler.log").read_text(errors="replace")

    def phase(self, name: str) -> str | None:
        record = self.state.load(name)
        return record.status.phase if record and record.status else None

    def applied(self, name: str) -> str | None:
        """The commit standalone mode reports running (only once the phase is Running)."""
        record = self.state.load(name)
        status = record.status if record else None
        if status is None or status.phase != "Running" or not status.applied_revision:
            return None
        return status.applied_revision.rpartition("sha1:")[2]

    def wait_applied(
        self, name: str, commit: str, timeout: float = 60, interval: float = 0.05
    ) -> None:
        self.procs.check()
        wait_for(
            lambda: self.applied(name) == commit,
            timeout=timeout,
            interval=interval,
            what=f"{name} at {commit[:7]}",
        )

    def get_tenants(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "bitbuilder"), "get", "tenants", "--state-dir", str(self.state.root)],
            capture_output=True, text=True, check=True, timeout=30,
        )  # fmt: skip

    # --- teardown -----------------------------------------------------------------------------

    def teardown(self) -> None:
        self.procs.stop("reconciler")  # first: it would bring deleted machines back
        leaders: list[int] = []
        if self.socket.exists():
            machines: list[MachineStatus] = self.call(lambda c: c.machines())
            for m in machines:
                leaders += [m.leader_pid] if m.leader_pid else []
                self.call(lambda c, n=m.name: c.delete(n))
        self.procs.stop_all()
        for pid in leaders:
            assert not Path(f"/proc/{pid}").exists() or _zombie(pid), f"machine pid {pid} left"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.fixture
def host(tmp_path: Path, busybox_rootfs: Path) -> Iterator[Host]:
    served = tmp_path / "git"
    served.mkdir()
    with git_daemon(served) as server:
        h = Host(tmp_path, server, busybox_rootfs)
        try:
            h.start_shim()
            yield h
        finally:
            h.teardown()
