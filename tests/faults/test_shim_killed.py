"""kill -9 of the shim: while tenants run, in the middle of a start, in the middle of a fetch.

The machines are not the shim's: they keep running (the same leader pid), their writable data
and persisted state stay, and the next shim finishes whatever was half done.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path

import pytest

from tests.faults.conftest import FAULTS, MARKER, FaultHost, motd
from tests.helpers.gated_proxy import GatedProxy
from tests.helpers.wait import wait_for

pytestmark = FAULTS


def test_running_tenants_are_adopted_with_the_same_leader(fault_host: FaultHost) -> None:
    host = fault_host
    before = {}
    for name, network in (("web", "isolated"), ("api", "none")):
        host.repo(name)
        before[name] = host.running(name, network={"mode": network})
        host.in_machine(before[name]["leaderPid"], MARKER).write_text(f"{name} data\n")
    states = {n: host.paths(n).state_file.read_bytes() for n in before}

    host.kill_shim()
    for name, status in before.items():
        assert Path(f"/proc/{status['leaderPid']}").exists(), f"{name} died with the shim"
    host.start_shim()

    for name, status in before.items():
        after = host.status(name)
        assert after["phase"] == "Running" and after["leaderPid"] == status["leaderPid"]
        assert after["appliedRevision"] == status["appliedRevision"]
        assert after.get("address") == status.get("address")
        marker = host.in_machine(after["leaderPid"], MARKER).read_text()
        assert marker == f"{name} data\n", "the machine's writable data is kept"
        host.one_machine(name)
        assert host.paths(name).state_file.read_bytes() == states[name], "state rewritten"


def _put_in_background(host: FaultHost, name: str, **overrides: object) -> threading.Thread:
    """A PUT that the kill will cut off (its caller sees the connection drop, not a reply)."""

    def put() -> None:
        with contextlib.suppress(OSError):  # the shim died under it
            host.put(name, **overrides)

    thread = threading.Thread(target=put, daemon=True)
    thread.start()
    return thread


def _settled(host: FaultHost, name: str) -> dict[str, object]:
    state = json.loads(host.paths(name).state_file.read_text())
    assert isinstance(state, dict)
    return state


@pytest.mark.parametrize(
    ("moment", "record_lost"),
    [("state.json", False), ("machine.json", False), ("executor.json", False),
     ("executor.json", True)],
    ids=["desired-persisted", "run-record-written", "nspawn-launched", "record-not-written"],
)  # fmt: skip
def test_killed_during_a_start(fault_host: FaultHost, moment: str, record_lost: bool) -> None:
    """Killed once the start reached `moment` (a file it writes): the next shim brings the
    tenant up exactly once, with no stray machine of the cut-off start. `record_lost`: killed
    after nspawn was spawned but before its pid was recorded (the record is removed after the
    kill, which is what that instant leaves)."""
    host = fault_host
    host.repo("other")
    other = host.running("other", network={"mode": "none"})
    commit = host.repo("web").head()
    folder = host.paths("web").root if moment == "state.json" else host.paths("web").run
    put = _put_in_background(host, "web")
    wait_for(lambda: (folder / moment).exists(), 60, interval=0.001, what=f"web's {moment}")
    host.kill_shim()
    put.join(30)
    if record_lost:
        (folder / moment).unlink()

    host.start_shim()
    web = host.status("web")
    assert web["phase"] == "Running" and web["appliedRevision"] == commit, web
    host.one_machine("web")  # no stray machine of the cut-off start
    assert _settled(host, "web").get("intent") is None
    assert host.status("other")["leaderPid"] == other["leaderPid"], "the other tenant kept"
    again = host.running("web")
    assert again["leaderPid"] == web["leaderPid"], "the same spec again changes nothing"


def test_killed_during_a_fetch_of_a_large_repo(fault_host: FaultHost) -> None:
    """The fetch is cut off half way: the next shim fetches again and starts the tenant; no
    partial pack is left in its copy of the repo."""
    host = fault_host
    repo = host.repo("web")
    commit = repo.commit({"blob.bin": os.urandom(6 << 20)}, "large")  # incompressible
    with GatedProxy(host.git.port, rate=2 << 20) as remote:
        remote.gate.set()
        url = host.git.url("web.git").replace(f":{host.git.port}/", f":{remote.port}/")
        spec = {"source": {"url": url, "ref": {"branch": "main"}}}
        put = _put_in_background(host, "web", **spec)
        wait_for(lambda: remote.sent > 2 << 20, 60, what="the fetch half way")
        host.kill_shim()
        put.join(30)
        assert host.paths("web").state_file.exists(), "the desired spec was persisted first"

        host.start_shim()  # resumes: fetches again, through the same slow remote
        web = host.status("web")
        assert web["phase"] == "Running" and web["appliedRevision"] == commit, web
    pack = host.paths("web").repo / "objects" / "pack"
    stray = [p.name for p in pack.iterdir() if not p.name.startswith("pack-")]
    assert not stray, f"partial fetch left in the repo: {stray}"
    host.one_machine("web")


def test_killed_during_an_update(fault_host: FaultHost) -> None:
    """Killed while the old revision's machine is replaced by the new one's: the next shim
    runs the new revision, once, on the same writable data."""
    host = fault_host
    repo = host.repo("web")
    first = host.running("web")
    host.in_machine(first["leaderPid"], MARKER).write_text("kept\n")
    update = repo.commit(motd("web v2"), "v2")
    put = _put_in_background(host, "web")
    wait_for(lambda: host.status("web")["phase"] == "Updating", 60, interval=0.001,
             what="web updating")  # fmt: skip
    host.kill_shim()
    put.join(30)

    host.start_shim()
    web = host.status("web")
    assert web["phase"] == "Running" and web["appliedRevision"] == update, web
    host.one_machine("web")
    assert host.in_machine(web["leaderPid"], "etc/motd").read_text() == "web v2\n"
    assert host.in_machine(web["leaderPid"], MARKER).read_text() == "kept\n"
