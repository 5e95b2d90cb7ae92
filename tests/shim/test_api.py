"""The shim's HTTP API over fakes: lifecycle, idempotency, errors in status, restart, images."""

from __future__ import annotations

import os
import subprocess
import threading

import pytest

from bitbuilder.hostshim.api import ImageSpec, MachineSpec
from bitbuilder.hostshim.source.git import Checkout
from tests.shim.conftest import REPO_URL, FakeShim, machine_spec, status
from tests.shim.fakes import FakeMachine, commit_id


def test_create_runs_at_the_repo_head(fake_shim: FakeShim) -> None:
    reply = fake_shim.client.put(machine_spec())
    assert reply.status == 200, reply.body
    st = status(reply.body)
    assert st.phase == "Running"
    assert st.applied_revision == commit_id("c1")
    assert st.source_revision == f"main@sha1:{commit_id('c1')}"
    assert st.leader_pid == fake_shim.runner.machines["web"].leader_pid
    assert [h.revision for h in st.history] == [commit_id("c1")]
    got = fake_shim.client.get("web")
    assert got.status == 200 and status(got.body).leader_pid == st.leader_pid


def test_same_spec_same_head_changes_nothing(fake_shim: FakeShim) -> None:
    first = status(fake_shim.client.put(machine_spec()).body)
    second = status(fake_shim.client.put(machine_spec()).body)
    assert second.leader_pid == first.leader_pid
    assert fake_shim.runner.starts == ["web"] and fake_shim.runner.stops == []
    assert second.spec_hash == first.spec_hash
    # The remote head was asked again (that is how the operator polls).
    assert len(fake_shim.remote.syncs) == 2


def test_new_commit_updates_the_machine(fake_shim: FakeShim) -> None:
    first = status(fake_shim.client.put(machine_spec()).body)
    c2 = fake_shim.remote.push(REPO_URL, "main", "c2")
    second = status(fake_shim.client.put(machine_spec()).body)
    assert second.phase == "Running"
    assert second.applied_revision == c2
    assert second.leader_pid != first.leader_pid
    assert [h.revision for h in second.history] == [c2, commit_id("c1")]
    current = fake_shim.config.state_dir / "tenants" / "web" / "current"
    assert current.resolve().name == c2


def test_bad_commit_is_refused_and_previous_keeps_running(fake_shim: FakeShim) -> None:
    first = status(fake_shim.client.put(machine_spec()).body)
    bad = fake_shim.remote.push(REPO_URL, "main", "bad")
    fake_shim.remote.bad.add(bad)
    reply = fake_shim.client.put(machine_spec())
    assert reply.status == 200
    st = status(reply.body)
    assert st.phase == "Running"
    assert st.leader_pid == first.leader_pid
    assert st.applied_revision == commit_id("c1")
    assert st.source_error is not None and st.source_error.reason == "InvalidRevision"
    assert st.source_error.revision == f"main@sha1:{bad}"
    # Fixing the repo clears the error and updates.
    good = fake_shim.remote.push(REPO_URL, "main", "c3")
    st = status(fake_shim.client.put(machine_spec()).body)
    assert st.source_error is None and st.applied_revision == good


def test_unreachable_source_without_good_revision_fails(fake_shim: FakeShim) -> None:
    fake_shim.remote.unreachable.add(REPO_URL)
    st = status(fake_shim.client.put(machine_spec()).body)
    assert st.phase == "Failed"
    assert st.source_error is not None and st.source_error.reason == "SourceUnreachable"
    assert "web" not in fake_shim.runner.machines


def test_spec_change_restarts_but_credentials_alone_do_not(fake_shim: FakeShim) -> None:
    first = status(fake_shim.client.put(machine_spec()).body)
    source = {
        "url": REPO_URL,
        "ref": {"branch": "main"},
        "credentials": {"username": "u", "password": "s3cret-token"},
    }
    st = status(fake_shim.client.put(machine_spec(source=source)).body)
    assert st.leader_pid == first.leader_pid
    assert st.spec_hash != first.spec_hash  # a credential change is noticed ...
    assert "s3cret" not in str(fake_shim.client.get("web").body)  # ... never shown
    st = status(fake_shim.client.put(machine_spec(resources={"memoryBytes": 2**30})).body)
    assert st.leader_pid != first.leader_pid


def test_failed_start_rolls_back_and_is_not_retried_each_poll(fake_shim: FakeShim) -> None:
    first = status(fake_shim.client.put(machine_spec()).body)
    fake_shim.runner.fail_images.add("broken")
    fake_shim.images.put("broken", ImageSpec(path="/srv/images/broken"))
    st = status(fake_shim.client.put(machine_spec(image="broken")).body)
    assert st.machine_error is not None and st.machine_error.reason == "MachineFailed"
    assert st.phase == "Running"  # the previous machine came back
    rolled_back = st.leader_pid
    assert rolled_back is not None and rolled_back != first.leader_pid
    assert fake_shim.runner.machines["web"].spec.image == "base"
    st = status(fake_shim.client.put(machine_spec(image="broken")).body)
    assert st.leader_pid == rolled_back  # the same failing target is not tried again
    st = status(fake_shim.client.put(machine_spec()).body)
    assert st.machine_error is None and st.phase == "Running"


@pytest.mark.parametrize(
    ("change", "reason", "says"),
    [
        ({"image": "typo"}, "ImageNotFound", "'typo'"),
        ({"runtime": "vmspawn"}, "Unsupported", "runtime vmspawn "),
    ],
)
def test_a_spec_that_cannot_start_does_not_stop_the_running_machine(
    fake_shim: FakeShim, change: dict[str, str], reason: str, says: str
) -> None:
    first = status(fake_shim.client.put(machine_spec()).body)
    st = status(fake_shim.client.put(machine_spec(**change)).body)
    assert st.machine_error is not None and st.machine_error.reason == reason
    assert says in st.machine_error.message
    assert st.phase == "Running" and st.leader_pid == first.leader_pid
    assert fake_shim.runner.stops == []


def test_a_machine_error_goes_with_the_spec_it_was_about(fake_shim: FakeShim) -> None:
    """Back to the running spec while the repo is unreachable: no stale start failure shown."""
    fake_shim.client.put(machine_spec())
    st = status(fake_shim.client.put(machine_spec(runtime="vmspawn")).body)
    assert st.machine_error is not None and st.machine_error.reason == "Unsupported"
    fake_shim.remote.unreachable.add(REPO_URL)
    st = status(fake_shim.client.put(machine_spec()).body)
    assert st.source_error is not None and st.source_error.reason == "SourceUnreachable"
    assert st.machine_error is None and st.phase == "Running"


def test_suspend_stops_and_resume_starts(fake_shim: FakeShim) -> None:
    status(fake_shim.client.put(machine_spec()).body)
    fake_shim.runner.data.add("web")
    st = status(fake_shim.client.put(machine_spec(suspend=True)).body)
    assert st.phase == "Stopped" and st.leader_pid is None
    assert "web" not in fake_shim.runner.machines and "web" in fake_shim.runner.data
    assert st.applied_revision == commit_id("c1")
    st = status(fake_shim.client.put(machine_spec()).body)
    assert st.phase == "Running" and st.leader_pid is not None


def test_restart_gives_a_new_leader_on_the_same_revision(fake_shim: FakeShim) -> None:
    first = status(fake_shim.client.put(machine_spec()).body)
    reply = fake_shim.client.request("POST", "/v1/machines/web/restart")
    assert reply.status == 200
    st = status(reply.body)
    assert st.leader_pid != first.leader_pid and st.applied_revision == first.applied_revision
    fake_shim.client.put(machine_spec(suspend=True))
    reply = fake_shim.client.request("POST", "/v1/machines/web/restart")
    assert reply.status == 409 and reply.body["error"] == "Conflict"


def test_delete_removes_machine_state_and_data(fake_shim: FakeShim) -> None:
    fake_shim.client.put(machine_spec())
    root = fake_shim.config.state_dir / "tenants" / "web"
    assert (root / "state.json").is_file()
    reply = fake_shim.client.delete("web")
    assert reply.status == 200
    assert "web" not in fake_shim.runner.machines and "web" not in fake_shim.runner.data
    assert not root.exists()
    assert fake_shim.client.get("web").status == 404
    assert fake_shim.client.delete("web").status == 404


def test_delete_keep_data_keeps_only_data(fake_shim: FakeShim) -> None:
    fake_shim.client.put(machine_spec())
    root = fake_shim.config.state_dir / "tenants" / "web"
    (root / "data").mkdir()
    (root / "data" / "db").write_text("x")
    assert fake_shim.client.delete("web", keep_data=True).status == 200
    assert "web" in fake_shim.runner.data
    assert sorted(p.name for p in root.iterdir()) == ["data"]
    assert fake_shim.client.get("web").status == 404


def test_list_machines(fake_shim: FakeShim) -> None:
    fake_shim.client.put(machine_spec("a"))
    fake_shim.client.put(machine_spec("b", source=None))
    reply = fake_shim.client.request("GET", "/v1/machines")
    assert reply.status == 200
    items = {i["name"]: i for i in reply.body["items"]}
    assert set(items) == {"a", "b"}
    assert items["b"]["phase"] == "Running" and "appliedRevision" not in items["b"]


def test_list_machines_in_pages(fake_shim: FakeShim) -> None:
    """limit/continue walk every machine once, in name order; a status is made again when the
    machine changes behind the shim (here: dies), though nothing was saved."""
    for name in ("e", "b", "d", "a", "c"):
        fake_shim.client.put(machine_spec(name, source=None))
    seen, query, pages = [], "?limit=2", 0
    while True:
        reply = fake_shim.client.request("GET", f"/v1/machines{query}")
        assert reply.status == 200 and len(reply.body["items"]) <= 2
        seen += [i["name"] for i in reply.body["items"]]
        pages += 1
        if "continue" not in reply.body:
            break
        query = f"?limit=2&continue={reply.body['continue']}"
    assert seen == ["a", "b", "c", "d", "e"] and pages == 3
    last = fake_shim.client.request("GET", "/v1/machines?limit=5").body
    assert len(last["items"]) == 5 and "continue" not in last
    fake_shim.runner.kill("c")
    listed = fake_shim.client.request("GET", "/v1/machines?limit=1&continue=b").body
    assert [(i["name"], i["phase"]) for i in listed["items"]] == [("c", "Pending")]
    assert listed["continue"] == "c"
    assert fake_shim.client.get("c").body["phase"] == "Pending"
    for query, field in (("limit=0", "limit"), ("limit=x", "limit"), ("limit=10001", "limit"),
                         ("continue=..", "continue"), ("continue=" + "a" * 64, "continue")):  # fmt: skip
        refused = fake_shim.client.request("GET", f"/v1/machines?{query}")
        assert (refused.status, refused.body["field"]) == (422, field), query


def test_images_put_get_list(fake_shim: FakeShim) -> None:
    reply = fake_shim.client.request("PUT", "/v1/images/alpine", {"path": "/srv/images/alpine"})
    assert reply.status == 200 and reply.body["name"] == "alpine"
    assert (
        fake_shim.client.request("GET", "/v1/images/alpine").body["source"] == "/srv/images/alpine"
    )
    names = [i["name"] for i in fake_shim.client.request("GET", "/v1/images").body["items"]]
    assert sorted(names) == ["alpine", "base"]
    missing = fake_shim.client.request("GET", "/v1/images/nope")
    assert missing.status == 422 and missing.body["error"] == "ImageNotFound"


def test_healthz_answers_while_a_put_is_busy(fake_shim: FakeShim) -> None:
    gate = threading.Event()
    entered = threading.Event()
    real_sync = type(fake_shim.manager)._reconcile

    def slow(self: object, state: object) -> None:
        entered.set()
        gate.wait(30)
        real_sync(self, state)  # type: ignore[arg-type]

    fake_shim.manager._reconcile = slow.__get__(fake_shim.manager)  # type: ignore[method-assign]
    result: list[int] = []
    worker = threading.Thread(
        target=lambda: result.append(fake_shim.client.put(machine_spec()).status)
    )
    worker.start()
    try:
        assert entered.wait(30)
        assert fake_shim.client.request("GET", "/healthz").status == 200
        assert fake_shim.client.get("web").status == 200  # status reads never wait for the lock
    finally:
        gate.set()
        worker.join(30)
    assert result == [200]


def test_runner_failures_are_status_not_server_errors(fake_shim: FakeShim) -> None:
    first = status(fake_shim.client.put(machine_spec()).body)
    fake_shim.runner.fail_stop.add("web")
    fake_shim.remote.push(REPO_URL, "main", "c2")
    reply = fake_shim.client.put(machine_spec())
    assert reply.status == 200
    st = status(reply.body)
    assert st.machine_error is not None and st.machine_error.reason == "StopFailed"
    assert st.leader_pid == first.leader_pid and st.applied_revision == commit_id("c1")
    st = status(fake_shim.client.put(machine_spec(suspend=True)).body)
    assert st.machine_error is not None and st.machine_error.reason == "StopFailed"
    assert st.phase == "Running"  # not Stopped: it still runs
    fake_shim.runner.fail_stop.clear()
    st = status(fake_shim.client.put(machine_spec()).body)
    assert st.machine_error is None and st.applied_revision == commit_id("c2")


def test_new_revision_is_fetched_and_validated_before_the_old_machine_stops(
    fake_shim: FakeShim,
) -> None:
    fake_shim.client.put(machine_spec())
    c2 = fake_shim.remote.push(REPO_URL, "main", "c2")
    seen_at_stop: list[tuple[str, str]] = []
    real_stop = fake_shim.runner.stop

    def stop(name: str) -> None:
        seen_at_stop.append(fake_shim.remote.syncs[-1])
        real_stop(name)

    fake_shim.runner.stop = stop  # type: ignore[method-assign]
    assert status(fake_shim.client.put(machine_spec()).body).applied_revision == c2
    assert seen_at_stop == [("web", c2)]


def gate_starts(fake_shim: FakeShim) -> tuple[threading.Event, threading.Event]:
    """From now on a machine start sets `entered`, then waits (30 s at most) for `gate`."""
    entered, gate = threading.Event(), threading.Event()
    real_start = fake_shim.runner.start

    def gated_start(spec: MachineSpec, checkout: Checkout | None) -> FakeMachine:
        entered.set()
        gate.wait(30)
        return real_start(spec, checkout)

    fake_shim.runner.start = gated_start  # type: ignore[method-assign]
    return entered, gate


def test_status_shows_updating_while_the_machine_is_replaced(fake_shim: FakeShim) -> None:
    fake_shim.client.put(machine_spec())
    fake_shim.remote.push(REPO_URL, "main", "c2")
    entered, gate = gate_starts(fake_shim)
    worker = threading.Thread(target=lambda: fake_shim.client.put(machine_spec()))
    worker.start()
    try:
        assert entered.wait(30)
        assert status(fake_shim.client.get("web").body).phase == "Updating"
    finally:
        gate.set()
        worker.join(30)
    assert status(fake_shim.client.get("web").body).phase == "Running"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount")
def test_delete_never_removes_through_a_mount(fake_shim: FakeShim) -> None:
    fake_shim.client.put(machine_spec())
    stuck = fake_shim.config.state_dir / "tenants" / "web" / "stuck"
    stuck.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(stuck)], check=True)
    try:
        (stuck / "precious").write_text("x")
        reply = fake_shim.client.delete("web")
        assert reply.status == 500 and reply.body["error"] == "CleanupFailed"
        assert "mounted" in reply.body["message"]
        assert (stuck / "precious").read_text() == "x"
    finally:
        subprocess.run(["umount", str(stuck)], check=True)
    assert fake_shim.client.delete("web").status == 200  # the delete resumes once it can
    assert not stuck.parent.exists()


def test_a_waiting_read_answers_when_the_phase_changes(fake_shim: FakeShim) -> None:
    assert status(fake_shim.client.put(machine_spec()).body).phase == "Running"
    entered, gate = gate_starts(fake_shim)
    fake_shim.remote.push(REPO_URL, "main", "c2")
    watched: list[object] = []
    watcher = threading.Thread(
        target=lambda: watched.append(
            fake_shim.client.request("GET", "/v1/machines/web?wait=30&unlessPhase=Running")
        )
    )
    watcher.start()
    update = threading.Thread(target=lambda: fake_shim.client.put(machine_spec()))
    update.start()
    try:
        assert entered.wait(30)
        watcher.join(30)
        assert watched, "the waiting read did not answer while the update ran"
        reply = watched[0]
        assert reply.status == 200 and reply.body["phase"] == "Updating"  # type: ignore[attr-defined]
    finally:
        gate.set()
        update.join(30)
    # Not waiting when the phase is already another; the time up answers the phase as it is.
    assert fake_shim.client.request("GET", "/v1/machines/web?wait=30").body["phase"] == "Running"
    late = fake_shim.client.request("GET", "/v1/machines/web?wait=0.2&unlessPhase=Running")
    assert late.status == 200 and late.body["phase"] == "Running"
    assert fake_shim.client.request("GET", "/v1/machines/nope?wait=0.2").status == 404


def test_waiting_read_parameters_are_checked(fake_shim: FakeShim) -> None:
    fake_shim.client.put(machine_spec())
    for query, field in (
        ("wait=999", "wait"),
        ("wait=soon", "wait"),
        ("unlessPhase=Asleep", "unlessPhase"),
    ):
        reply = fake_shim.client.request("GET", f"/v1/machines/web?{query}")
        assert reply.status == 422 and reply.body["field"] == field, query
