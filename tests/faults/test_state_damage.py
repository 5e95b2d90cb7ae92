"""A tenant's state.json truncated, turned to garbage or gone while the shim was down: the
next shim answers, reports that tenant (and leaves its file and machine as they are), and
runs the others as before."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.faults.conftest import FAULTS, MARKER, FaultHost

pytestmark = FAULTS


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(512))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [(_truncate, "StateUnreadable"), (_garbage, "StateUnreadable"), (Path.unlink, "StateMissing")],
    ids=["truncated", "garbage", "missing"],
)
def test_damaged_state_is_reported_and_the_others_run(
    fault_host: FaultHost, damage: object, reason: str
) -> None:
    host = fault_host
    before = {}
    for name in ("a", "b", "c"):
        host.repo(name)
        before[name] = host.running(name, network={"mode": "none"})
    host.in_machine(before["b"]["leaderPid"], MARKER).write_text("b's data\n")
    host.kill_shim()
    state_file = host.paths("b").state_file
    assert callable(damage)
    damage(state_file)
    damaged = state_file.read_bytes() if state_file.exists() else None

    host.start_shim()
    assert host.client.request("GET", "/healthz").status == 200
    listed = host.client.request("GET", "/v1/machines").body["items"]
    assert sorted(m["name"] for m in listed) == ["a", "c"]
    for name in ("a", "c"):
        assert host.status(name)["leaderPid"] == before[name]["leaderPid"]
    reply = host.client.get("b")
    assert reply.status == 409 and reply.body["error"] == reason, reply.body
    assert str(state_file) in reply.body["message"]
    refused = host.put("b", network={"mode": "none"})
    assert refused.status == 409 and refused.body["error"] == reason, refused.body
    leader = before["b"]["leaderPid"]
    assert Path(f"/proc/{leader}").exists(), "b's machine is left running"
    assert host.in_machine(leader, MARKER).read_text() == "b's data\n"
    now = state_file.read_bytes() if state_file.exists() else None
    assert now == damaged, "the damaged file is left for a human"

    # the way out the message names: delete (its data kept) and PUT again
    assert host.client.delete("b").status == 200
    assert not Path(f"/proc/{leader}").exists() or host.nspawns("b") == []
    again = host.running("b", network={"mode": "none"})
    assert host.in_machine(again["leaderPid"], MARKER).read_text() == "b's data\n"
