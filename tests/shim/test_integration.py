"""The shim end to end: real git repos (file://), the real GitSource, runner and nspawn machines.

Each machine's revision is read back from inside it (/etc/motd comes from the repo's confext
tree), and its leader pid tells whether it was restarted.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bitbuilder.hostshim.api import MachineStatus
from bitbuilder.hostshim.paths import TenantPaths
from tests.helpers.gitserve import TenantRepo, git_daemon, http_server
from tests.helpers.wait import wait_for
from tests.shim.conftest import RealShim, real_config

pytestmark = [
    pytest.mark.nspawn,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root and systemd-nspawn"),
]


@pytest.fixture
def shim(tmp_path: Path, busybox_rootfs: Path) -> Iterator[RealShim]:
    config = real_config(tmp_path, trusted_image_paths=(busybox_rootfs.parent,))
    shim = RealShim(config).start()
    try:
        reply = shim.client.request("PUT", "/v1/images/busybox", {"path": str(busybox_rootfs)})
        assert reply.status == 200, reply.body
        yield shim
    finally:
        shim.stop_all()


def make_repo(tmp_path: Path, name: str, motd: str) -> TenantRepo:
    repo = TenantRepo(tmp_path / "served", f"{name}.git")
    repo.commit({"confext/base/etc/motd": motd}, message=motd)
    return repo


def spec(name: str, repo: TenantRepo, **overrides: Any) -> dict[str, Any]:
    body = {
        "name": name,
        "image": "busybox",
        "source": {"url": repo.file_url(), "ref": {"branch": "main"}},
        "network": {"mode": "none"},
    }
    return {**body, **overrides}


def put(shim: RealShim, body: dict[str, Any]) -> MachineStatus:
    reply = shim.client.put(body)
    assert reply.status == 200, reply.body
    return MachineStatus.model_validate(reply.body)


def get(shim: RealShim, name: str) -> MachineStatus:
    reply = shim.client.get(name)
    assert reply.status == 200, reply.body
    return MachineStatus.model_validate(reply.body)


def motd(status: MachineStatus) -> str:
    assert status.leader_pid is not None
    return subprocess.run(
        ["nsenter", "-t", str(status.leader_pid), "-m", "cat", "/etc/motd"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip


def alive(pid: int | None) -> bool:
    return pid is not None and Path(f"/proc/{pid}").exists()


def mounts_under(path: Path) -> list[str]:
    text = Path("/proc/self/mountinfo").read_text()
    return [line.split()[4] for line in text.splitlines() if line.split()[4].startswith(str(path))]


def test_lifecycle_create_update_refuse_delete(shim: RealShim, tmp_path: Path) -> None:
    repo = make_repo(tmp_path, "web", "v1\n")
    first = put(shim, spec("web", repo))
    assert first.phase == "Running" and first.applied_revision == repo.head()
    assert first.source_revision == f"main@sha1:{repo.head()}"
    assert motd(first) == "v1\n"

    same = put(shim, spec("web", repo))  # the operator's poll: nothing changes
    assert same.leader_pid == first.leader_pid
    assert same.source_error is None and same.machine_error is None

    v2 = repo.commit({"confext/base/etc/motd": "v2\n"})
    second = put(shim, spec("web", repo))
    assert second.applied_revision == v2 and second.leader_pid != first.leader_pid
    assert motd(second) == "v2\n"
    assert not alive(first.leader_pid)

    bad = repo.commit({"confext/broken/usr/bin/tool": "not a confext\n"})
    refused = put(shim, spec("web", repo))
    assert refused.phase == "Running" and refused.leader_pid == second.leader_pid
    assert refused.applied_revision == v2
    assert refused.source_error is not None and refused.source_error.reason == "InvalidRevision"
    assert refused.source_error.revision == f"main@sha1:{bad}"
    assert "confext/broken" in refused.source_error.message
    assert motd(refused) == "v2\n"

    paths = TenantPaths(shim.config, "web")
    assert shim.client.delete("web").status == 200
    assert not alive(second.leader_pid)
    assert mounts_under(paths.run) == [] and mounts_under(paths.root) == []
    assert not paths.root.exists() and not paths.run.exists()
    assert shim.client.get("web").status == 404


def test_restarted_shim_readopts_running_tenants(shim: RealShim, tmp_path: Path) -> None:
    before = {n: put(shim, spec(n, make_repo(tmp_path, n, f"{n}\n"))) for n in ("a", "b")}
    shim.restart()
    for name, status in before.items():
        now = get(shim, name)
        assert now.phase == "Running" and now.leader_pid == status.leader_pid
        assert now.applied_revision == status.applied_revision
    assert motd(get(shim, "a")) == "a\n"


def test_suspend_keeps_data_and_resume_starts(shim: RealShim, tmp_path: Path) -> None:
    repo = make_repo(tmp_path, "web", "v1\n")
    running = put(shim, spec("web", repo))
    subprocess.run(
        ["nsenter", "-t", str(running.leader_pid), "-m", "sh", "-c", "echo kept > /root/note"],
        check=True, timeout=30,
    )  # fmt: skip
    stopped = put(shim, spec("web", repo, suspend=True))
    assert stopped.phase == "Stopped" and stopped.leader_pid is None
    assert not alive(running.leader_pid)
    resumed = put(shim, spec("web", repo))
    assert resumed.phase == "Running" and resumed.applied_revision == running.applied_revision
    note = subprocess.run(
        ["nsenter", "-t", str(resumed.leader_pid), "-m", "cat", "/root/note"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert note.stdout == "kept\n"


def test_drift_machine_killed_is_restarted(shim: RealShim, tmp_path: Path) -> None:
    first = put(shim, spec("web", make_repo(tmp_path, "web", "v1\n")))
    assert first.leader_pid is not None
    os.kill(first.leader_pid, signal.SIGKILL)  # init dies: the container exits
    wait_for(lambda: shim.manager.runner.inspect("web") is None, what="the machine to exit")
    assert shim.manager.check_drift() == ["web"]
    now = get(shim, "web")
    assert now.phase == "Running" and alive(now.leader_pid) and now.leader_pid != first.leader_pid
    assert now.last_drift is not None and now.last_drift.reason == "MachineRestarted"
    assert motd(now) == "v1\n"


def test_a_machine_that_died_is_not_shown_running(shim: RealShim, tmp_path: Path) -> None:
    """Statuses are kept from one change to the next; a machine that exits on its own (no
    change the shim made) is shown as it is at the next read, in a list as in a get."""
    first = put(shim, spec("web", make_repo(tmp_path, "web", "v1\n")))
    listed = shim.client.request("GET", "/v1/machines").body["items"]
    assert [(m["phase"], m["leaderPid"]) for m in listed] == [("Running", first.leader_pid)]
    assert first.leader_pid is not None
    nspawn = shim.manager.runner.executor.pid("web")  # type: ignore[attr-defined]
    os.kill(first.leader_pid, signal.SIGKILL)  # init dies: the container exits
    wait_for(lambda: not alive(nspawn), what="nspawn to exit")
    now = get(shim, "web")
    assert now.phase == "Pending" and now.leader_pid is None and now.address is None
    listed = shim.client.request("GET", "/v1/machines").body["items"]
    assert [(m["phase"], m.get("leaderPid")) for m in listed] == [("Pending", None)]


def test_drift_modified_revision_tree_is_checked_out_again(shim: RealShim, tmp_path: Path) -> None:
    first = put(shim, spec("web", make_repo(tmp_path, "web", "v1\n")))
    assert first.applied_revision is not None
    assert shim.manager.check_drift() == []
    tree = TenantPaths(shim.config, "web").revision(first.applied_revision)
    tampered = tree / "confext/base/etc/motd"
    tampered.write_text("tampered\n")
    assert shim.manager.check_drift() == ["web"]
    now = get(shim, "web")
    assert now.last_drift is not None and now.last_drift.reason == "RevisionTreeModified"
    assert "confext/base/etc/motd" in now.last_drift.message
    assert now.leader_pid != first.leader_pid and now.phase == "Running"
    assert tampered.read_text() == "v1\n"
    assert motd(now) == "v1\n"
    assert shim.manager.check_drift() == []


@pytest.mark.parametrize("transport", ["git", "http"])
def test_create_and_update_over_network_transports(
    shim: RealShim, tmp_path: Path, transport: str
) -> None:
    repo = make_repo(tmp_path, "web", "v1\n")
    serve = git_daemon if transport == "git" else http_server
    with serve(tmp_path / "served") as server:
        body = spec("web", repo)
        body["source"]["url"] = server.url("web.git")
        first = put(shim, body)
        assert first.phase == "Running" and first.applied_revision == repo.head()
        assert motd(first) == "v1\n"
        v2 = repo.commit({"confext/base/etc/motd": "v2\n"})
        second = put(shim, body)
        assert second.applied_revision == v2 and motd(second) == "v2\n"
        assert put(shim, body).leader_pid == second.leader_pid


def test_rollback_by_pinning_and_by_force_push(shim: RealShim, tmp_path: Path) -> None:
    repo = make_repo(tmp_path, "web", "v1\n")
    v1 = repo.head()
    put(shim, spec("web", repo))
    v2 = repo.commit({"confext/base/etc/motd": "v2\n"})
    assert put(shim, spec("web", repo)).applied_revision == v2

    pinned_body = spec("web", repo)
    pinned_body["source"]["ref"] = {"commit": v1}
    pinned = put(shim, pinned_body)
    assert pinned.applied_revision == v1 and motd(pinned) == "v1\n"
    assert [h.revision for h in pinned.history] == [v1, v2]

    assert put(shim, spec("web", repo)).applied_revision == v2  # following main again
    repo.force_push(v1)
    back = put(shim, spec("web", repo))
    assert back.applied_revision == v1 and motd(back) == "v1\n"
    assert back.source_revision == f"main@sha1:{v1}"
