"""Shim restarts (re-adoption, half-done work) and drift correction, over fakes."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from bitbuilder.hostshim.api import MachineSpec, MachineStatus
from bitbuilder.hostshim.state.store import Intent, StateStore, TenantState, machine_hash
from tests.helpers.wait import wait_for
from tests.shim.conftest import REPO_URL, FakeShim, machine_spec, serving_fake_shim, status
from tests.shim.fakes import FakeSource, commit_id


def restart_with_state(shim: FakeShim, edit: Callable[[TenantState], None]) -> StateStore:
    """Stop the shim, change web's state file as a crash would have left it, start again."""
    shim.stop()
    store = StateStore(shim.config)
    state = store.load("web")
    assert state is not None
    edit(state)
    store.save(state)
    shim.start()
    return store


def test_restarted_shim_readopts_without_restarting(fake_shim: FakeShim) -> None:
    pids = {n: status(fake_shim.client.put(machine_spec(n)).body).leader_pid for n in ("a", "b")}
    fake_shim.restart()
    for name, pid in pids.items():
        st = status(fake_shim.client.get(name).body)
        assert st.phase == "Running" and st.leader_pid == pid
    assert fake_shim.runner.starts == ["a", "b"] and fake_shim.runner.stops == []


def test_restarted_shim_brings_back_machines_that_died_meanwhile(fake_shim: FakeShim) -> None:
    fake_shim.client.put(machine_spec())
    fake_shim.stop()
    fake_shim.runner.kill("web")  # e.g. the host rebooted
    fake_shim.start()
    st = status(fake_shim.client.get("web").body)
    assert st.phase == "Running" and st.applied_revision == commit_id("c1")
    assert fake_shim.runner.starts == ["web", "web"]


def test_half_done_apply_is_finished_at_startup(fake_shim: FakeShim) -> None:
    fake_shim.client.put(machine_spec())
    c2 = fake_shim.remote.push(REPO_URL, "main", "c2")

    def persisted_then_died(state: TenantState) -> None:  # desired written, nothing done
        state.desired = MachineSpec.model_validate(machine_spec(image="base"))
        state.intent = Intent.apply

    store = restart_with_state(fake_shim, persisted_then_died)
    st = status(fake_shim.client.get("web").body)
    assert st.applied_revision == c2 and st.phase == "Running"
    loaded = store.load("web")
    assert loaded is not None and loaded.intent is None


def test_half_done_delete_is_finished_at_startup(fake_shim: FakeShim) -> None:
    fake_shim.client.put(machine_spec())
    store = restart_with_state(fake_shim, lambda state: setattr(state, "intent", Intent.delete))
    assert fake_shim.client.get("web").status == 404
    assert "web" not in fake_shim.runner.machines
    assert not store.paths("web").root.exists()


def test_machine_without_state_is_stopped_at_startup(fake_shim: FakeShim) -> None:
    fake_shim.client.put(machine_spec())
    fake_shim.stop()
    shutil.rmtree(StateStore(fake_shim.config).paths("web").root)  # no tenant of that name
    fake_shim.start()
    assert "web" not in fake_shim.runner.machines


def test_lost_state_file_is_reported_and_its_machine_kept(fake_shim: FakeShim) -> None:
    """Only the state file is gone (the repo is still there): a loss, not a deleted tenant."""
    fake_shim.client.put(machine_spec())
    fake_shim.stop()
    StateStore(fake_shim.config).remove("web")
    fake_shim.start()
    reply = fake_shim.client.get("web")
    assert reply.status == 409 and reply.body["error"] == "StateMissing"
    assert "web" in fake_shim.runner.machines


def test_unreadable_state_is_reported_and_kept(fake_shim: FakeShim) -> None:
    fake_shim.client.put(machine_spec())
    fake_shim.stop()
    path = StateStore(fake_shim.config).paths("web").state_file
    doc = json.loads(path.read_text())
    doc["version"] = 99
    path.write_text(json.dumps(doc))
    fake_shim.start()
    reply = fake_shim.client.get("web")
    assert reply.status == 409 and reply.body["error"] == "StateVersionUnsupported"
    assert fake_shim.client.put(machine_spec()).status == 409
    assert json.loads(path.read_text())["version"] == 99
    assert "web" in fake_shim.runner.machines  # adopted, left alone


def test_drift_restarts_a_machine_that_died(fake_shim: FakeShim) -> None:
    first = status(fake_shim.client.put(machine_spec()).body)
    assert fake_shim.manager.check_drift() == []
    fake_shim.runner.kill("web")
    assert fake_shim.manager.check_drift() == ["web"]
    st = status(fake_shim.client.get("web").body)
    assert st.phase == "Running" and st.leader_pid != first.leader_pid
    assert st.drift_corrections == 1
    assert st.last_drift is not None and st.last_drift.reason == "MachineRestarted"
    assert st.applied_revision == first.applied_revision
    assert fake_shim.manager.check_drift() == []


def test_drift_rechecks_out_a_modified_revision_tree(fake_shim: FakeShim) -> None:
    first = status(fake_shim.client.put(machine_spec()).body)
    tree = StateStore(fake_shim.config).paths("web").revision(commit_id("c1"))
    (tree / "README").write_text("tampered")
    assert fake_shim.manager.check_drift() == ["web"]
    assert (tree / "README").read_text() == commit_id("c1")
    assert [p.name for p in tree.parent.iterdir()] == [commit_id("c1")]  # nothing left aside
    st = status(fake_shim.client.get("web").body)
    assert st.leader_pid != first.leader_pid and st.phase == "Running"
    assert st.last_drift is not None and st.last_drift.reason == "RevisionTreeModified"
    assert "README" in st.last_drift.message


def test_drift_stops_a_suspended_machine_that_runs(fake_shim: FakeShim) -> None:
    fake_shim.client.put(machine_spec(suspend=True))
    fake_shim.runner.start(MachineSpec.model_validate(machine_spec()), None)
    assert fake_shim.manager.check_drift() == ["web"]
    assert "web" not in fake_shim.runner.machines
    st = status(fake_shim.client.get("web").body)
    assert st.phase == "Stopped" and st.last_drift is not None


def test_drift_state_survives_a_restart(fake_shim: FakeShim) -> None:
    fake_shim.client.put(machine_spec())
    fake_shim.runner.kill("web")
    fake_shim.manager.check_drift()
    fake_shim.restart()
    assert status(fake_shim.client.get("web").body).drift_corrections == 1
    state = StateStore(fake_shim.config).load("web")
    assert isinstance(state, TenantState) and state.drift.count == 1


def test_drift_reports_a_restart_that_fails(fake_shim: FakeShim) -> None:
    fake_shim.client.put(machine_spec())
    fake_shim.runner.kill("web")
    fake_shim.runner.fail_images.add("base")
    assert fake_shim.manager.check_drift() == ["web"]
    st = status(fake_shim.client.get("web").body)
    assert st.phase == "Failed" and st.machine_error is not None
    assert st.last_drift is not None and st.last_drift.reason == "MachineRestartFailed"
    fake_shim.runner.fail_images.clear()
    assert fake_shim.manager.check_drift() == ["web"]
    st = status(fake_shim.client.get("web").body)
    assert st.phase == "Running" and st.machine_error is None and st.drift_corrections == 2


def test_the_server_checks_for_drift_on_its_own(tmp_path: Path) -> None:
    with serving_fake_shim(tmp_path, drift_interval=0.05) as shim:
        first = status(shim.client.put(machine_spec()).body)
        shim.runner.kill("web")

        def corrected() -> MachineStatus | None:
            st = status(shim.client.get("web").body)
            return st if st.drift_corrections else None

        again = wait_for(corrected, what="the periodic drift check to restart the machine")
        assert again.last_drift is not None and again.last_drift.reason == "MachineRestarted"
        assert again.leader_pid not in (None, first.leader_pid)


def test_crash_after_the_new_machine_started_is_not_a_restart(fake_shim: FakeShim) -> None:
    fake_shim.client.put(machine_spec())
    c2 = fake_shim.remote.push(REPO_URL, "main", "c2")
    leaders: list[int] = []

    def started_then_died(state: TenantState) -> None:
        # The new revision runs; the state still names the old one, the start in flight.
        checkout = FakeSource(StateStore(fake_shim.config).paths("web"), fake_shim.remote).sync(
            state.desired
        )
        fake_shim.runner.stop("web")
        leaders.append(fake_shim.runner.start(state.desired, checkout).leader_pid)
        state.intent = Intent.apply
        state.starting = f"{c2}:{machine_hash(state.desired)}"

    store = restart_with_state(fake_shim, started_then_died)
    st = status(fake_shim.client.get("web").body)
    assert st.leader_pid == leaders[0] and st.applied_revision == c2 and st.phase == "Running"
    assert [h.revision for h in st.history] == [c2, commit_id("c1")]
    loaded = store.load("web")
    assert loaded is not None and loaded.starting is None and loaded.intent is None


def test_a_machine_at_another_revision_is_still_replaced(fake_shim: FakeShim) -> None:
    first = status(fake_shim.client.put(machine_spec()).body)
    c2 = fake_shim.remote.push(REPO_URL, "main", "c2")

    def died_before_the_start(state: TenantState) -> None:
        state.intent = Intent.apply
        state.starting = f"{c2}:{machine_hash(state.desired)}"

    restart_with_state(fake_shim, died_before_the_start)
    st = status(fake_shim.client.get("web").body)
    assert st.applied_revision == c2 and st.leader_pid != first.leader_pid
