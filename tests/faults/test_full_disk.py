"""The state dir on a full file system (a small tmpfs the case mounts): an update is refused
naming the host's condition (not a 500), the state file is never half written, the machine
keeps running and the shim keeps answering; once there is room again the update goes
through."""

from __future__ import annotations

import errno
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.conftest import FAULTS, FaultHost, motd, serving

pytestmark = FAULTS


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "bb-faults", str(disk)],
                   check=True)  # fmt: skip
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.fixture
def full_disk_host(tmp_path: Path, small_disk: Path, busybox_rootfs: Path) -> Iterator[FaultHost]:
    (tmp_path / "host").mkdir()
    with serving(tmp_path / "host", busybox_rootfs, state_dir=small_disk / "state") as host:
        yield host


def _fill(folder: Path) -> Path:
    """A file that takes every free block of `folder`'s file system."""
    filler = folder / "filler"
    with filler.open("wb") as out:
        try:
            while True:
                out.write(b"\0" * (1 << 16))
                out.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_full_state_disk(full_disk_host: FaultHost) -> None:
    host = full_disk_host
    repo = host.repo("web")
    before = host.running("web")
    state_file = host.paths("web").state_file
    saved = state_file.read_bytes()
    filler = _fill(host.config.state_dir)

    update = repo.commit(motd("web v2"), "v2")
    reply = host.put("web")
    assert reply.status == 503 and reply.body["error"] == "HostDiskFull", reply.body
    assert "no space left" in reply.body["message"] and "--state-dir" in reply.body["message"]
    now = state_file.read_bytes()
    assert now == saved or json.loads(now)["name"] == "web", "never a half-written state"
    assert not list(state_file.parent.glob(".state.*")), "no temp state file left"
    assert host.client.request("GET", "/healthz").status == 200
    status = host.status("web")
    assert status["phase"] == "Running" and status["leaderPid"] == before["leaderPid"]

    filler.unlink()
    after = host.running("web")
    assert after["appliedRevision"] == update and "sourceError" not in after, after
