"""The tenant's git server or repo goes wrong between updates: the last good revision keeps
running (same machine, same data), status says why, and the next good commit goes through."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.faults.conftest import FAULTS, MARKER, FaultHost, motd
from tests.helpers.gated_proxy import GatedProxy
from tests.helpers.gitserve import TenantRepo, git

pytestmark = FAULTS


def _update(host: FaultHost, url: str) -> dict[str, Any]:
    """What the operator does on every interval: PUT the same spec (the shim fetches)."""
    reply = host.put("web", source={"url": url, "ref": {"branch": "main"}})
    assert reply.status == 200, reply.body
    body: dict[str, Any] = reply.body
    return body


def _kept(before: dict[str, Any], after: dict[str, Any], reason: str) -> None:
    assert after["phase"] == "Running" and after["leaderPid"] == before["leaderPid"], after
    assert after["appliedRevision"] == before["appliedRevision"], "the last good one runs"
    assert after["sourceError"]["reason"] == reason, after["sourceError"]
    assert after["sourceError"]["message"]


def _delete_branch(repo: TenantRepo) -> None:
    git("config", "receive.denyDeleteCurrent", "ignore", cwd=repo.bare)
    git("push", "-q", "origin", ":refs/heads/main", cwd=repo.work)


def _bad_layout(repo: TenantRepo) -> None:
    repo.commit({"confext/motd/usr/bin/x": "not under etc\n"}, "bad layout")


@pytest.mark.parametrize(
    ("fault", "reason"),
    [(_delete_branch, "RefNotFound"), (_bad_layout, "InvalidRevision")],
    ids=["deleted-branch", "bad-layout"],
)
def test_bad_update_keeps_the_last_good_revision(
    fault_host: FaultHost, fault: Callable[[TenantRepo], None], reason: str
) -> None:
    host = fault_host
    repo = host.repo("web")
    url = host.git.url("web.git")
    before = _update(host, url)
    host.in_machine(before["leaderPid"], MARKER).write_text("kept\n")
    fault(repo)
    after = _update(host, url)
    _kept(before, after, reason)
    assert host.in_machine(after["leaderPid"], MARKER).read_text() == "kept\n"

    if (repo.work / "confext/motd/usr").exists():
        repo.remove("confext/motd/usr")
    good = repo.commit(motd("web v2"), "fixed")  # pushes the branch again
    fixed = _update(host, url)
    assert fixed["appliedRevision"] == good and "sourceError" not in fixed, fixed
    assert host.in_machine(fixed["leaderPid"], "etc/motd").read_text() == "web v2\n"
    assert host.in_machine(fixed["leaderPid"], MARKER).read_text() == "kept\n"


def test_git_server_down_keeps_the_last_good_revision(fault_host: FaultHost) -> None:
    host = fault_host
    repo = host.repo("web")
    with GatedProxy(host.git.port) as remote:
        remote.gate.set()
        url = host.git.url("web.git").replace(f":{host.git.port}/", f":{remote.port}/")
        before = _update(host, url)
        pending = repo.commit(motd("web v2"), "v2")
    after = _update(host, url)  # the proxy is closed: connections are refused
    _kept(before, after, "SourceUnreachable")
    assert str(remote.port) in after["sourceError"]["message"]
    with GatedProxy(host.git.port) as remote:  # the server is back (at another port)
        remote.gate.set()
        url = host.git.url("web.git").replace(f":{host.git.port}/", f":{remote.port}/")
        back = _update(host, url)
    assert back["appliedRevision"] == pending and "sourceError" not in back, back


def test_force_push_is_followed_with_the_data_kept(fault_host: FaultHost) -> None:
    """Git is the truth: a rewritten branch is followed (it is no error), the data stays."""
    host = fault_host
    repo = host.repo("web")
    first = repo.head()
    url = host.git.url("web.git")
    repo.commit(motd("web v2"), "v2")
    before = _update(host, url)
    host.in_machine(before["leaderPid"], MARKER).write_text("kept\n")
    repo.force_push(first)
    rewritten = repo.commit(motd("web v2 rewritten"), "v2 again")
    after = _update(host, url)
    assert after["phase"] == "Running" and after["appliedRevision"] == rewritten, after
    assert [h["revision"] for h in after["history"]][:2] == [rewritten, before["appliedRevision"]]
    assert host.in_machine(after["leaderPid"], "etc/motd").read_text() == "web v2 rewritten\n"
    assert host.in_machine(after["leaderPid"], MARKER).read_text() == "kept\n"
