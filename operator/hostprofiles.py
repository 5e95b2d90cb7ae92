"""HostProfile -> HostLayersSpec -> the shim -> HostProfileStatus: the core both drivers share.

reconcile_profile() checks whether the profile selects this node (a node it no longer selects
has its layers unmerged), resolves the profile's secrets, PUTs its layers to the shim and
computes the status: conditions like a Tenant's (Ready, Reconciling, Stalled, SourceReady),
the merged and the previous revision. Nothing is written here: the driver persists the status
and emits the events.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from bitbuilder.hostshim.api import HostLayersPhase, HostLayersSpec, HostLayersStatus
from bitbuilder.hostshim.api import parse_duration as seconds_of
from bitbuilder.operator.api import (
    HostProfile,
    HostProfilePhase,
    HostProfileStatus,
    RevisionRecord,
    SourceStatus,
)
from bitbuilder.operator.reconcile import BACKOFF_MIN, jittered
from bitbuilder.operator.shimclient import ShimApiError, ShimClient, ShimError
from bitbuilder.operator.status import Event, Problem, Verdict, find_condition, set_condition
from bitbuilder.operator.translate import (
    SecretResolver,
    TranslateError,
    load_source_secrets,
    source_spec,
)


@dataclass(frozen=True)
class ProfileResult:
    """status None: the profile does not select this node (its layers are not here)."""

    status: HostProfileStatus | None
    events: list[Event]
    requeue_after: float


def selects(profile: HostProfile, labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in profile.spec.node_selector.items())


def interval(profile: HostProfile) -> float:
    return seconds_of(profile.spec.source.interval)


async def host_layers_spec(profile: HostProfile, resolver: SecretResolver) -> HostLayersSpec:
    """The shim's request for this profile. Raises TranslateError (a secret missing or bad)."""
    source = profile.spec.source
    secrets = await load_source_secrets(source, resolver)
    return HostLayersSpec(
        name=profile.metadata.name,
        source=source_spec(source, secrets),
        extensions=profile.spec.extensions,
    )


async def reconcile_profile(
    profile: HostProfile,
    shim: ShimClient,
    resolver: SecretResolver,
    node: str,
    labels: Mapping[str, str],
    previous: HostProfileStatus | None = None,
) -> ProfileResult:
    """One pass for one profile on this node."""
    previous = previous if previous is not None else profile.status
    if not selects(profile, labels):
        await shim.delete_host_layers(profile.metadata.name)
        return ProfileResult(None, [], jittered(interval(profile)))
    layers: HostLayersStatus | None = None
    problem: Problem | None = None
    try:
        layers = await shim.apply_host_layers(await host_layers_spec(profile, resolver))
    except TranslateError as exc:
        problem = Problem(exc.reason, exc.message, "SourceReady")
    except ShimApiError as exc:
        problem = Problem(exc.error.error, exc.error.message, "SourceReady", exc.status >= 500)
    except ShimError as exc:
        problem = Problem("ShimUnavailable", str(exc), "SourceReady", transient=True)
    status = profile_status(profile, layers, problem, node, _utcnow(), previous)
    ready = find_condition(status, "Ready")
    delay = (
        interval(profile)
        if ready and ready.status == "True"
        else min(interval(profile), max(BACKOFF_MIN, 30.0))
    )
    return ProfileResult(status, profile_events(previous, status), jittered(delay))


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _verdicts(layers: HostLayersStatus | None, problem: Problem | None) -> dict[str, Verdict]:
    """Ready, Reconciling, Stalled and SourceReady for what the shim (or our step) said."""
    error = layers and (layers.source_error or layers.merge_error)
    if problem is not None:
        bad = Verdict("False", problem.reason, problem.message)
    elif error:
        bad = Verdict("False", error.reason, error.message)
    else:
        bad = None
    transient = problem is not None and problem.transient
    applied = layers is not None and layers.phase is HostLayersPhase.applied
    if bad is None:
        good = Verdict("True", "Merged", f"merged {layers.applied_revision}" if layers else "")
        source = Verdict("True", "Verified", good.message)
        return {
            "Ready": good,
            "Reconciling": Verdict("False", "Merged", ""),
            "Stalled": Verdict("False", "Merged", ""),
            "SourceReady": source,
        }
    kept = " (the merged revision stays)" if applied else ""
    return {
        "Ready": Verdict("Unknown" if transient else "False", bad.reason, bad.message + kept),
        "Reconciling": Verdict("True" if transient else "False", bad.reason, bad.message),
        "Stalled": Verdict("False" if transient else "True", bad.reason, bad.message),
        "SourceReady": bad,
    }


def profile_status(
    profile: HostProfile,
    layers: HostLayersStatus | None,
    problem: Problem | None,
    node: str,
    now: datetime,
    previous: HostProfileStatus | None,
) -> HostProfileStatus:
    prev = previous or HostProfileStatus()
    generation = profile.metadata.generation
    conditions = [
        set_condition(prev, type_, verdict, now, generation)
        for type_, verdict in _verdicts(layers, problem).items()
    ]
    if layers is None:  # our own step failed: what the shim merged is as last reported
        return prev.model_copy(
            update={"conditions": conditions, "observed_generation": generation, "node": node}
        )
    phase = {
        HostLayersPhase.applied: HostProfilePhase.applied,
        HostLayersPhase.failed: HostProfilePhase.failed,
        HostLayersPhase.pending: HostProfilePhase.pending,
    }[layers.phase]
    return HostProfileStatus(
        phase=phase,
        observed_generation=generation,
        conditions=conditions,
        node=node,
        source=SourceStatus(
            revision=layers.source_revision, url=profile.spec.source.url, last_checked=now
        ),
        applied_revision=layers.applied_revision,
        previous_revision=layers.previous_revision,
        history=[
            RevisionRecord(revision=h.revision, applied_at=h.applied_at) for h in layers.history
        ],
    )


def profile_events(previous: HostProfileStatus | None, new: HostProfileStatus) -> list[Event]:
    """A new merged revision; Ready turning good or bad (with its reason)."""
    prev = previous or HostProfileStatus()
    events: list[Event] = []
    if new.applied_revision and new.applied_revision != prev.applied_revision:
        was = f" (was {prev.applied_revision})" if prev.applied_revision else ""
        events.append(Event("Normal", "RevisionMerged", f"merged {new.applied_revision}{was}"))
    ready, old = find_condition(new, "Ready"), find_condition(prev, "Ready")
    changed = (
        old is None or ready is None or (old.status, old.reason) != (ready.status, ready.reason)
    )
    if ready is not None and ready.status != "True" and changed:
        events.append(Event("Warning", ready.reason, ready.message))
    return events
