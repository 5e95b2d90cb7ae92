"""TenantStatus from the shim's MachineStatus: phases, conditions, revisions, events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bitbuilder.hostshim.api import AppliedRevision, ErrorInfo, MachinePhase, MachineStatus
from bitbuilder.operator.api import Tenant, TenantPhase, TenantStatus
from bitbuilder.operator.status import (
    Observation,
    Problem,
    compute_status,
    find_condition,
    transition_events,
)
from tests.operator_core.conftest import SHA_A, SHA_B, make_tenant

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def machine(phase: MachinePhase = MachinePhase.running, **kw: Any) -> MachineStatus:
    fields: dict[str, Any] = {
        "name": "web",
        "phase": phase,
        "runtime": "nspawn",
        "spec_hash": "h",
        "source_revision": f"main@sha1:{SHA_A}",
        "applied_revision": SHA_A,
        "history": [AppliedRevision(revision=SHA_A, applied_at=T0)],
        "address": "10.0.0.2",
        "started_at": T0,
    }
    fields.update(kw)
    return MachineStatus(**fields)


def status(
    tenant: Tenant,
    m: MachineStatus | None,
    previous: TenantStatus | None = None,
    problem: Problem | None = None,
    now: datetime = T0,
) -> TenantStatus:
    return compute_status(Observation(tenant, m, "node1", now, problem), previous)


def cond(s: TenantStatus, type_: str) -> tuple[str, str]:
    c = find_condition(s, type_)
    assert c is not None, type_
    return c.status, c.reason


def test_running_tenant_is_ready_with_everything_filled(tenant: Tenant) -> None:
    s = status(tenant, machine())
    assert s.phase is TenantPhase.running
    assert s.observed_generation == 1
    assert cond(s, "Ready") == ("True", "Succeeded")
    assert cond(s, "SourceReady") == ("True", "Succeeded")
    assert cond(s, "MachineReady") == ("True", "Running")
    assert cond(s, "Stalled")[0] == "False" and cond(s, "Reconciling")[0] == "False"
    assert s.applied_revision == f"main@sha1:{SHA_A}"
    assert s.short_revision == SHA_A[:7]
    assert s.source is not None and s.source.revision == f"main@sha1:{SHA_A}"
    assert s.source.url == "https://git.example/web.git" and s.source.last_checked == T0
    assert s.machine is not None and (s.machine.node, s.machine.address) == ("node1", "10.0.0.2")
    assert s.machine.started_at == T0
    assert [h.revision for h in s.history] == [f"main@sha1:{SHA_A}"]
    assert all(c.observed_generation == 1 for c in s.conditions)


def test_same_observation_twice_changes_nothing(tenant: Tenant) -> None:
    first = status(tenant, machine())
    again = status(tenant, machine(), previous=first, now=T0 + timedelta(minutes=5))
    assert again.model_dump(exclude={"source"}) == first.model_dump(exclude={"source"})
    assert transition_events(first, again) == []


def test_transition_time_moves_only_with_the_status(tenant: Tenant) -> None:
    first = status(tenant, machine())
    later = T0 + timedelta(minutes=1)
    moved = machine(source_revision=f"main@sha1:{SHA_B}", applied_revision=SHA_B)
    second = status(tenant, moved, previous=first, now=later)
    ready = find_condition(second, "Ready")
    assert ready is not None and ready.last_transition_time == T0
    assert SHA_B in ready.message  # message follows the new revision, the time does not move
    broken = machine(source_error=ErrorInfo(reason="LayoutError", message="bad", at=later))
    third = status(tenant, broken, previous=second, now=later)
    ready = find_condition(third, "Ready")
    assert ready is not None and ready.status == "False" and ready.last_transition_time == later


def test_bad_commit_stalls_while_the_last_good_revision_keeps_running(tenant: Tenant) -> None:
    good = status(tenant, machine())
    err = ErrorInfo(
        reason="LayoutError", message="units/x.service: not a unit", revision=SHA_B, at=T0
    )
    s = status(tenant, machine(source_error=err), previous=good)
    assert s.phase is TenantPhase.running
    assert cond(s, "Stalled") == ("True", "LayoutError")
    assert cond(s, "SourceReady") == ("False", "LayoutError")
    assert cond(s, "Ready") == ("False", "LayoutError")
    assert cond(s, "MachineReady") == ("True", "Running")
    source = find_condition(s, "SourceReady")
    assert source is not None
    assert SHA_B in source.message and "units/x.service" in source.message
    assert f"still running main@sha1:{SHA_A}" in source.message
    assert s.applied_revision == f"main@sha1:{SHA_A}"
    events = transition_events(good, s)
    assert [(e.type, e.reason) for e in events] == [
        ("Warning", "LayoutError")
    ]  # one problem, one event
    assert events[0].message.startswith("SourceReady=False: revision " + SHA_B)
    fixed = status(
        tenant, machine(source_revision=f"main@sha1:{SHA_B}", applied_revision=SHA_B), previous=s
    )
    recovery = transition_events(s, fixed)
    assert [e.message.split(":")[0] for e in recovery] == [
        "applied main@sha1",
        "SourceReady=True",
        "Ready=True",
    ]
    assert all(e.type == "Normal" for e in recovery)


def test_no_good_revision_yet_is_failed(tenant: Tenant) -> None:
    err = ErrorInfo(reason="SourceUnreachable", message="connection refused", at=T0)
    m = machine(MachinePhase.failed, applied_revision=None, history=[], source_error=err)
    s = status(tenant, m)
    assert s.phase is TenantPhase.failed
    assert cond(s, "Stalled") == ("True", "SourceUnreachable")
    assert s.applied_revision is None and s.short_revision is None


@pytest.mark.parametrize(
    ("phase", "applied", "expected"),
    [
        (MachinePhase.pending, None, TenantPhase.provisioning),
        (MachinePhase.pending, SHA_A, TenantPhase.updating),
        (MachinePhase.starting, SHA_A, TenantPhase.provisioning),
        (MachinePhase.updating, SHA_A, TenantPhase.updating),
        (MachinePhase.running, SHA_A, TenantPhase.running),
        (MachinePhase.failed, SHA_A, TenantPhase.failed),
    ],
)
def test_machine_phase_maps_to_tenant_phase(
    tenant: Tenant, phase: MachinePhase, applied: str | None, expected: TenantPhase
) -> None:
    s = status(tenant, machine(phase, applied_revision=applied))
    assert s.phase is expected
    busy = phase in (MachinePhase.pending, MachinePhase.starting, MachinePhase.updating)
    assert cond(s, "Reconciling")[0] == ("True" if busy else "False")
    if busy:
        assert cond(s, "Ready") == ("False", "Progressing")


def test_suspend_then_resume() -> None:
    suspended = make_tenant(suspend=True)
    s = status(suspended, machine(MachinePhase.stopped, address=None, started_at=None))
    assert s.phase is TenantPhase.suspended
    assert cond(s, "MachineReady") == ("False", "Suspended")
    assert cond(s, "Stalled")[0] == "False"
    stopping = status(suspended, machine())
    assert stopping.phase is TenantPhase.updating and cond(stopping, "Reconciling")[0] == "True"
    resumed = status(make_tenant(), machine(), previous=s)
    assert resumed.phase is TenantPhase.running
    assert any(e.reason == "Running" for e in transition_events(s, resumed))


def test_tenant_without_source() -> None:
    t = make_tenant(source=None)
    s = status(t, machine(source_revision=None, applied_revision=None, history=[]))
    assert cond(s, "SourceReady") == ("True", "NoSource")
    assert cond(s, "Ready")[0] == "True"
    assert s.source is None and s.applied_revision is None


def test_translate_problem_stalls_and_names_the_secret(tenant: Tenant) -> None:
    problem = Problem("SecretNotFound", "secret 'git' not found", "SourceReady")
    s = status(tenant, None, problem=problem)
    assert s.phase is TenantPhase.failed
    assert cond(s, "SourceReady") == ("False", "SecretNotFound")
    assert cond(s, "Stalled") == ("True", "SecretNotFound")
    ready = find_condition(s, "Ready")
    assert ready is not None and "'git'" in ready.message


def test_shim_unreachable_keeps_what_was_known(tenant: Tenant) -> None:
    good = status(tenant, machine())
    problem = Problem("ShimUnavailable", "socket refused", "MachineReady", transient=True)
    s = status(tenant, None, previous=good, problem=problem, now=T0 + timedelta(minutes=1))
    assert s.phase is TenantPhase.running
    assert cond(s, "Ready") == ("Unknown", "ShimUnavailable")
    assert cond(s, "Reconciling") == ("True", "ShimUnavailable")
    assert cond(s, "Stalled")[0] == "False"
    assert cond(s, "MachineReady") == ("True", "Running")
    assert s.applied_revision == good.applied_revision and s.machine == good.machine
    assert s.source is not None and s.source.last_checked == T0


def test_shim_unreachable_is_a_warning_told_once_and_so_is_its_end(tenant: Tenant) -> None:
    """`bitbuilder run` logs only events: without one, a missing shim went unnoticed."""
    problem = Problem("ShimUnavailable", "host shim unreachable", "MachineReady", transient=True)
    fresh = status(tenant, None, problem=problem)
    assert ("Warning", "ShimUnavailable", "Ready=Unknown: host shim unreachable") in [
        (e.type, e.reason, e.message) for e in transition_events(None, fresh)
    ]
    good = status(tenant, machine())
    down = status(tenant, None, previous=good, problem=problem, now=T0 + timedelta(minutes=1))
    assert [(e.type, e.reason) for e in transition_events(good, down)] == [
        ("Warning", "ShimUnavailable")
    ]
    still = status(tenant, None, previous=down, problem=problem, now=T0 + timedelta(minutes=2))
    assert transition_events(down, still) == []
    up = status(tenant, machine(), previous=still, now=T0 + timedelta(minutes=3))
    assert [(e.type, e.message[:10]) for e in transition_events(still, up)] == [
        ("Normal", "Ready=True")
    ]


def test_rollback_event_names_both_revisions(tenant: Tenant) -> None:
    first = status(tenant, machine(source_revision=f"main@sha1:{SHA_B}", applied_revision=SHA_B))
    back = status(tenant, machine(), previous=first)
    events = transition_events(first, back)
    assert [e.message for e in events if e.reason == "RevisionApplied"] == [
        f"applied main@sha1:{SHA_A} (was main@sha1:{SHA_B})"
    ]


def test_history_keeps_the_ref_a_revision_was_applied_under() -> None:
    tagged = make_tenant(source={"url": "https://g/x.git", "ref": {"tag": "v1"}})
    first = status(tagged, machine(source_revision=f"v1@sha1:{SHA_A}"))
    pinned = make_tenant(source={"url": "https://g/x.git", "ref": {"commit": SHA_B}})
    history = [AppliedRevision(revision=SHA_B, applied_at=T0), *machine().history]
    m = machine(source_revision=f"{SHA_B}@sha1:{SHA_B}", applied_revision=SHA_B, history=history)
    s = status(pinned, m, previous=first)
    assert [h.revision for h in s.history] == [f"{SHA_B}@sha1:{SHA_B}", f"v1@sha1:{SHA_A}"]


def test_new_generation_is_observed() -> None:
    t = make_tenant()
    first = status(t, machine())
    t2 = t.model_copy(update={"metadata": t.metadata.model_copy(update={"generation": 7})})
    s = status(t2, machine(), previous=first)
    assert s.observed_generation == 7
    assert all(c.observed_generation == 7 for c in s.conditions)


def test_fresh_healthy_tenant_emits_no_warnings(tenant: Tenant) -> None:
    events = transition_events(None, status(tenant, machine()))
    assert all(e.type == "Normal" for e in events)
    assert {e.reason for e in events} == {"RevisionApplied", "Running"}


phases = st.sampled_from(list(MachinePhase))
errors = st.none() | st.builds(
    ErrorInfo,
    reason=st.sampled_from(["LayoutError", "SourceUnreachable"]),
    message=st.text(max_size=20),
    at=st.just(T0),
)


@given(phases, errors, errors, st.booleans(), st.booleans())
def test_conditions_are_always_consistent(
    phase: MachinePhase,
    source_error: ErrorInfo | None,
    machine_error: ErrorInfo | None,
    suspend: bool,
    applied: bool,
) -> None:
    t = make_tenant(suspend=suspend)
    m = machine(
        phase,
        source_error=source_error,
        machine_error=machine_error,
        applied_revision=SHA_A if applied else None,
    )
    s = status(t, m)
    again = status(t, m, previous=s)
    assert again == s  # idempotent
    assert {c.type for c in s.conditions} == {
        "Ready", "Reconciling", "Stalled", "SourceReady", "MachineReady"
    }  # fmt: skip
    ready, stalled = cond(s, "Ready"), cond(s, "Stalled")
    if ready[0] == "True":
        assert stalled[0] == "False" and cond(s, "Reconciling")[0] == "False"
        assert s.phase is TenantPhase.running
    if stalled[0] == "True":
        assert ready == ("False", stalled[1])
    if source_error is not None:
        assert stalled[0] == "True" and cond(s, "SourceReady")[0] == "False"


def test_drift_corrected_by_the_shim_is_shown_and_told_once(tenant: Tenant) -> None:
    first = status(tenant, machine())
    assert first.machine is not None and first.machine.drift_corrections is None
    drift = ErrorInfo(reason="RevisionTreeModified", message="etc/motd changed", at=T0)
    s = status(tenant, machine(drift_corrections=1, last_drift=drift), previous=first)
    assert s.machine is not None and s.machine.drift_corrections == 1
    assert s.machine.last_drift == "2026-01-01T00:00:00Z RevisionTreeModified: etc/motd changed"
    events = transition_events(first, s)
    assert [(e.type, e.reason) for e in events] == [("Warning", "DriftCorrected")]
    assert "etc/motd changed" in events[0].message
    again = status(tenant, machine(drift_corrections=1, last_drift=drift), previous=s)
    assert transition_events(s, again) == []
    assert cond(s, "Ready") == ("True", "Succeeded")  # corrected: still ready
