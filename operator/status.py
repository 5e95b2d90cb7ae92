"""TenantStatus from what the shim reported: pure, in small steps.

Like Flux's source-controller: each step decides one condition (SourceReady, MachineReady,
Stalled, Reconciling) and Ready summarises them. A condition keeps its lastTransitionTime while
its status stays the same, so re-reconciling an unchanged tenant writes an identical status.
The events to emit are derived from the difference between the previous and the new status.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

from bitbuilder.hostshim.api import MachinePhase, MachineStatus
from bitbuilder.operator.api import (
    Condition,
    MachineInfo,
    RevisionRecord,
    SourceStatus,
    Tenant,
    TenantPhase,
    TenantStatus,
)

HISTORY_LIMIT = 10
Status = Literal["True", "False", "Unknown"]
Step = Literal["SourceReady", "MachineReady"]


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to emit for a transition or an error."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Problem:
    """A failure in the operator's own steps (secrets, translation, talking to the shim).

    `transient` problems (the shim unreachable) are retried: Reconciling. The others need a
    change from someone: Stalled. `step` is the condition the problem belongs to."""

    reason: str
    message: str
    step: Step
    transient: bool = False


@dataclass(frozen=True)
class Verdict:
    status: Status
    reason: str
    message: str


@dataclass(frozen=True)
class Observation:
    """Everything a status is computed from."""

    tenant: Tenant
    machine: MachineStatus | None
    node: str
    now: datetime
    problem: Problem | None = None


# --- revisions --------------------------------------------------------------------------------


def revision_name(commit: str, tenant: Tenant, known: list[str]) -> str:
    """`<ref>@sha1:<commit>`, reusing a name already known for that commit (its ref may have
    been a different one when it was applied)."""
    for name in known:
        if name.endswith(f"sha1:{commit}"):
            return name
    source = tenant.spec.source
    if source is None or source.ref.commit == commit:
        return f"sha1:{commit}"
    return f"{source.ref.describe()}@sha1:{commit}"


def _known_names(obs: Observation, previous: TenantStatus) -> list[str]:
    known = [r.revision for r in previous.history]
    if previous.applied_revision:
        known.append(previous.applied_revision)
    if obs.machine is not None and obs.machine.source_revision:
        known.insert(0, obs.machine.source_revision)
    return known


def applied_revision(obs: Observation, previous: TenantStatus) -> str | None:
    if obs.machine is None:
        return previous.applied_revision
    if obs.machine.applied_revision is None:
        return None
    return revision_name(obs.machine.applied_revision, obs.tenant, _known_names(obs, previous))


def history(obs: Observation, previous: TenantStatus) -> list[RevisionRecord]:
    if obs.machine is None:
        return previous.history
    known = _known_names(obs, previous)
    records = [
        RevisionRecord(
            revision=revision_name(h.revision, obs.tenant, known), applied_at=h.applied_at
        )
        for h in obs.machine.history
    ]
    return records[:HISTORY_LIMIT]


# --- one step per condition -------------------------------------------------------------------


def source_verdict(obs: Observation, previous: TenantStatus) -> Verdict:
    machine, problem = obs.machine, obs.problem
    if problem is not None and problem.step == "SourceReady" and not problem.transient:
        return Verdict("False", problem.reason, problem.message)
    if obs.tenant.spec.source is None:
        return Verdict("True", "NoSource", "no source repository: the image runs as it is")
    if machine is None:
        return _unchanged(previous, "SourceReady", "waiting for the host shim")
    if machine.source_error is not None:
        err = machine.source_error
        message = err.message
        if err.revision and err.revision not in message:
            message = f"revision {err.revision}: {message}"
        if machine.applied_revision:
            running = applied_revision(obs, previous)
            message = f"{message} (still running {running})"
        return Verdict("False", err.reason, message)
    if machine.source_revision:
        return Verdict("True", "Succeeded", f"fetched revision {machine.source_revision}")
    return Verdict("Unknown", "Progressing", "waiting for the first fetch")


def machine_verdict(obs: Observation, previous: TenantStatus) -> Verdict:
    machine, problem = obs.machine, obs.problem
    if problem is not None and problem.step == "MachineReady" and not problem.transient:
        return Verdict("False", problem.reason, problem.message)
    if machine is None:
        if problem is not None and problem.transient:
            return _unchanged(previous, "MachineReady", "waiting for the host shim")
        return Verdict("False", "NotCreated", "the machine has not been created yet")
    if machine.machine_error is not None:
        return Verdict("False", machine.machine_error.reason, machine.machine_error.message)
    phase = machine.phase
    if phase is MachinePhase.running:
        where = f" at {machine.address}" if machine.address else ""
        what = applied_revision(obs, previous) or "the image"
        return Verdict("True", "Running", f"running {what} on node {obs.node}{where}")
    if phase is MachinePhase.stopped and obs.tenant.spec.suspend:
        return Verdict("False", "Suspended", "the machine is stopped; its data is kept")
    if phase is MachinePhase.failed:
        return Verdict("False", "MachineFailed", "the machine cannot run")
    return Verdict("False", "Progressing", f"the machine is {phase.value.lower()}")


def _unchanged(previous: TenantStatus, type_: str, message: str) -> Verdict:
    """Keep what was known while the shim cannot be asked."""
    old = find_condition(previous, type_)
    if old is None:
        return Verdict("Unknown", "Progressing", message)
    return Verdict(old.status, old.reason, old.message)


def stalled_verdict(obs: Observation, source: Verdict, machine: Verdict) -> Verdict:
    """Stalled: no progress without a change from someone (a bad commit, a missing secret)."""
    problem = obs.problem
    if problem is not None and not problem.transient:
        return Verdict("True", problem.reason, problem.message)
    m = obs.machine
    if m is not None and m.source_error is not None:
        return Verdict("True", source.reason, source.message)
    if m is not None and (m.machine_error is not None or m.phase is MachinePhase.failed):
        return Verdict("True", machine.reason, machine.message)
    return Verdict("False", "Succeeded", "")


def reconciling_verdict(obs: Observation) -> Verdict:
    problem, m = obs.problem, obs.machine
    if problem is not None and problem.transient:
        return Verdict("True", problem.reason, problem.message)
    if m is not None and m.phase in (
        MachinePhase.pending,
        MachinePhase.starting,
        MachinePhase.updating,
    ):
        return Verdict("True", "Progressing", f"the machine is {m.phase.value.lower()}")
    if m is not None and m.phase is MachinePhase.running and obs.tenant.spec.suspend:
        return Verdict("True", "Progressing", "suspending the machine")
    return Verdict("False", "Succeeded", "")


def ready_verdict(
    obs: Observation, source: Verdict, machine: Verdict, stalled: Verdict, reconciling: Verdict
) -> Verdict:
    if stalled.status == "True":
        return Verdict("False", stalled.reason, stalled.message)
    if reconciling.status == "True":
        transient = obs.problem is not None and obs.problem.transient
        return Verdict("Unknown" if transient else "False", reconciling.reason, reconciling.message)
    if machine.status != "True":
        return Verdict("False", machine.reason, machine.message)
    if source.status != "True":
        return Verdict("False", source.reason, source.message)
    return Verdict("True", "Succeeded", machine.message)


def phase(obs: Observation, previous: TenantStatus, stalled: Verdict) -> TenantPhase:
    m = obs.machine
    if m is None:
        if stalled.status == "True":
            return TenantPhase.failed
        return previous.phase or TenantPhase.pending
    running = m.phase is MachinePhase.running
    if stalled.status == "True" and not running:
        return TenantPhase.failed
    if obs.tenant.spec.suspend and m.phase is MachinePhase.stopped:
        return TenantPhase.suspended
    return {
        MachinePhase.pending: TenantPhase.updating
        if m.applied_revision
        else TenantPhase.provisioning,
        MachinePhase.starting: TenantPhase.provisioning,
        MachinePhase.running: TenantPhase.updating
        if obs.tenant.spec.suspend
        else TenantPhase.running,
        MachinePhase.updating: TenantPhase.updating,
        MachinePhase.stopped: TenantPhase.provisioning,
        MachinePhase.failed: TenantPhase.failed,
    }[m.phase]


# --- assembling -------------------------------------------------------------------------------


def blocking_problem(status: TenantStatus | None) -> str | None:
    """Why a tenant will not get to Running without someone's change ('Reason: message'),
    or None while it may still get there by itself."""
    stalled = find_condition(status, "Stalled")
    if stalled is not None and stalled.status == "True":
        return f"{stalled.reason}: {stalled.message}"
    if status is not None and status.phase is TenantPhase.failed:
        machine = find_condition(status, "MachineReady")
        return f"{machine.reason}: {machine.message}" if machine else "the machine failed"
    return None


class HasConditions(Protocol):
    """A status with kstatus conditions (a Tenant's or a HostProfile's)."""

    conditions: list[Condition]


def find_condition(status: HasConditions | None, type_: str) -> Condition | None:
    if status is None:
        return None
    return next((c for c in status.conditions if c.type == type_), None)


def set_condition(
    previous: HasConditions, type_: str, verdict: Verdict, now: datetime, generation: int | None
) -> Condition:
    """lastTransitionTime moves only when the status does."""
    old = find_condition(previous, type_)
    since = old.last_transition_time if old is not None and old.status == verdict.status else now
    return Condition(
        type=type_,
        status=verdict.status,
        reason=verdict.reason,
        message=verdict.message,
        last_transition_time=since,
        observed_generation=generation,
    )


def compute_status(obs: Observation, previous: TenantStatus | None) -> TenantStatus:
    prev = previous or TenantStatus()
    source = source_verdict(obs, prev)
    machine = machine_verdict(obs, prev)
    stalled = stalled_verdict(obs, source, machine)
    reconciling = reconciling_verdict(obs)
    ready = ready_verdict(obs, source, machine, stalled, reconciling)
    generation = obs.tenant.metadata.generation
    verdicts = {
        "Ready": ready,
        "Reconciling": reconciling,
        "Stalled": stalled,
        "SourceReady": source,
        "MachineReady": machine,
    }
    m = obs.machine
    src = obs.tenant.spec.source
    checked = m is not None and obs.problem is None
    return TenantStatus(
        phase=phase(obs, prev, stalled),
        observed_generation=generation,
        conditions=[set_condition(prev, t, v, obs.now, generation) for t, v in verdicts.items()],
        source=None
        if src is None
        else SourceStatus(
            revision=m.source_revision if m is not None else _prev_source(prev).revision,
            url=src.url,
            last_checked=obs.now if checked else _prev_source(prev).last_checked,
        ),
        applied_revision=applied_revision(obs, prev),
        history=history(obs, prev),
        machine=(prev.machine if m is None else _machine_info(obs.node, m)),
    )


def invalid_spec_status(
    previous: TenantStatus, message: str, generation: int | None, now: datetime
) -> TenantStatus:
    """A Tenant the API server took but the models refuse: Stalled until someone fixes it.
    The machine is not touched (it keeps running its last good spec), so its phase, source
    and machine fields stay as they were."""
    invalid = Verdict("True", "InvalidSpec", message)
    verdicts = {
        "Ready": Verdict("False", "InvalidSpec", message),
        "Reconciling": Verdict("False", "InvalidSpec", "waiting for a valid spec"),
        "Stalled": invalid,
    }
    kept = [c for c in previous.conditions if c.type not in verdicts]
    return previous.model_copy(
        update={
            "phase": previous.phase or TenantPhase.failed,
            "observed_generation": generation,
            "conditions": [
                set_condition(previous, t, v, now, generation) for t, v in verdicts.items()
            ]
            + kept,
        }
    )


def unplaced_status(
    tenant: Tenant, reason: str, message: str, stalled: bool, now: datetime
) -> TenantStatus:
    """Pending: no node runs the machine (yet). Stalled when only a change helps (the
    scheduler finds no node for it), else Reconciling. The rest of the status stays."""
    prev = tenant.status or TenantStatus()
    waiting = Verdict("False", reason, message)
    calm = Verdict("False", "Succeeded", "")
    old_source = find_condition(prev, "SourceReady")
    source = (
        Verdict("Unknown", "Progressing", "not fetched on this node yet")
        if old_source is None
        else Verdict(old_source.status, old_source.reason, old_source.message)
    )
    generation = tenant.metadata.generation
    verdicts = {
        "Ready": waiting,
        "Reconciling": calm if stalled else Verdict("True", reason, message),
        "Stalled": Verdict("True", reason, message) if stalled else calm,
        "SourceReady": source,
        "MachineReady": waiting,
    }
    conditions = [set_condition(prev, t, v, now, generation) for t, v in verdicts.items()]
    return prev.model_copy(
        update={
            "phase": TenantPhase.pending,
            "observed_generation": generation,
            "conditions": conditions,
        }
    )


def _prev_source(previous: TenantStatus) -> SourceStatus:
    return previous.source or SourceStatus()


def _machine_info(node: str, m: MachineStatus) -> MachineInfo:
    drift = m.last_drift
    return MachineInfo(
        node=node,
        address=m.address,
        started_at=m.started_at,
        drift_corrections=m.drift_corrections or None,
        last_drift=None
        if drift is None
        else f"{drift.at:%Y-%m-%dT%H:%M:%SZ} {drift.reason}: {drift.message}",
    )


def transition_events(previous: TenantStatus | None, new: TenantStatus) -> list[Event]:
    """One event per transition: a new applied revision, a phase, a condition going good or bad."""
    prev = previous or TenantStatus()
    events: list[Event] = []
    if new.applied_revision and new.applied_revision != prev.applied_revision:
        was = f" (was {prev.applied_revision})" if prev.applied_revision else ""
        events.append(Event("Normal", "RevisionApplied", f"applied {new.applied_revision}{was}"))
    drifted = (new.machine and new.machine.drift_corrections) or 0
    if drifted > ((prev.machine and prev.machine.drift_corrections) or 0) and new.machine:
        what = new.machine.last_drift or "host out of step with the applied revision"
        events.append(Event("Warning", "DriftCorrected", f"the host shim corrected drift: {what}"))
    if new.phase is not None and new.phase != prev.phase:
        kind: Literal["Normal", "Warning"] = (
            "Warning" if new.phase is TenantPhase.failed else "Normal"
        )
        events.append(Event(kind, new.phase.value, f"phase {prev.phase or '-'} -> {new.phase}"))
    # The specific conditions first: one problem shows in several conditions (SourceReady,
    # Stalled, Ready) but is one event.
    told: set[str] = set()
    for type_ in ("SourceReady", "MachineReady", "Stalled", "Ready"):
        cond = find_condition(new, type_)
        old = find_condition(prev, type_)
        if cond is None or (
            old is not None and (old.status, old.reason) == (cond.status, cond.reason)
        ):
            continue
        bad = cond.status == ("True" if type_ == "Stalled" else "False")
        # Ready=Unknown is a transient problem (the shim unreachable): the user must hear of it.
        bad = bad or (type_ == "Ready" and cond.status == "Unknown")
        if (old is None or type_ == "Stalled") and not bad:
            continue  # a fresh tenant's good news is the phase; Stalled=False is Ready's news
        body = cond.message or cond.reason
        if body not in told:
            told.add(body)
            events.append(
                Event("Warning" if bad else "Normal", cond.reason, f"{type_}={cond.status}: {body}")
            )
    return events
