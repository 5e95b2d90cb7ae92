"""The reconcile core both drivers share (kopf handlers and standalone mode).

reconcile(): placement check -> image import -> secrets -> translate -> PUT to the shim ->
status + events + when to come back. finalize(): the machine is gone before the Tenant goes.
Neither writes anywhere: the driver persists the status and emits the events.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from bitbuilder.hostshim.api import MachinePhase, MachineStatus, parse_duration
from bitbuilder.operator.api import Tenant, TenantPhase, TenantStatus
from bitbuilder.operator.shimclient import ShimApiError, ShimClient, ShimError
from bitbuilder.operator.status import (
    Event,
    Observation,
    Problem,
    Step,
    compute_status,
    find_condition,
    transition_events,
)
from bitbuilder.operator.translate import (
    SecretResolver,
    TranslateError,
    image_spec,
    load_secrets,
    to_machine_spec,
)

NO_SOURCE_INTERVAL = 300.0  # still come back now and then: the shim reports drift
BACKOFF_MIN = 2.0
BACKOFF_MAX = 300.0
JITTER = 0.1
PROGRESS_RETRY = 0.5  # after a watch that came back without news (an error, a shim too old)
WATCH_WAIT = 30.0
BUSY = (MachinePhase.pending, MachinePhase.starting, MachinePhase.updating)

Progress = Callable[[TenantStatus], Awaitable[None]]


@dataclass(frozen=True)
class Node:
    """The node this operator drives: its name and labels (for nodeName/nodeSelector)."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ReconcileResult:
    """status None: the tenant is placed on another node (and nothing of it runs here)."""

    status: TenantStatus | None
    events: list[Event]
    requeue_after: float | None
    machine: MachineStatus | None = None


def placed_here(tenant: Tenant, node: Node) -> bool:
    spec = tenant.spec
    if spec.node_name is not None and spec.node_name != node.name:
        return False
    return all(node.labels.get(k) == v for k, v in spec.node_selector.items())


def interval(tenant: Tenant) -> float:
    source = tenant.spec.source
    return NO_SOURCE_INTERVAL if source is None else parse_duration(source.interval)


def jittered(seconds: float, rng: random.Random | None = None) -> float:
    """Spread timers so tenants with the same interval do not all poll at once."""
    spread = (rng or random).uniform(-JITTER, JITTER)
    return max(0.1, seconds * (1 + spread))


def backoff(tenant: Tenant, status: TenantStatus, now: datetime) -> float:
    """Retry delay while not Ready: as long as it has been failing (doubling), within bounds."""
    ready = find_condition(status, "Ready")
    failing_for = 0.0 if ready is None else (now - ready.last_transition_time).total_seconds()
    return min(max(BACKOFF_MIN, failing_for), BACKOFF_MAX, max(interval(tenant), BACKOFF_MIN))


def requeue_after(tenant: Tenant, status: TenantStatus, now: datetime) -> float:
    ready = find_condition(status, "Ready")
    healthy = ready is not None and ready.status == "True"
    suspended = tenant.spec.suspend and status.phase is TenantPhase.suspended
    return jittered(interval(tenant) if healthy or suspended else backoff(tenant, status, now))


def _utcnow() -> datetime:
    return datetime.now(UTC)


async def reconcile(
    tenant: Tenant,
    shim: ShimClient,
    secrets: SecretResolver,
    node: Node,
    previous: TenantStatus | None = None,
    progress: Progress | None = None,
    placed: bool | None = None,
) -> ReconcileResult:
    """One pass. `previous` defaults to the tenant's own status; `progress` is called with an
    intermediate status (Provisioning/Updating) while the shim is busy; `placed` is the
    scheduler's word in a cluster (None: match nodeName/nodeSelector against `node`, as
    standalone mode does). Every failure becomes status, except one: a tenant placed on another
    node whose copy here cannot be stopped raises ShimError (the caller retries)."""
    previous = previous if previous is not None else tenant.status
    if not (placed_here(tenant, node) if placed is None else placed):
        # It may have run here before it moved: stop that copy, keep its data.
        await shim.delete(tenant.metadata.name, keep_data=True)
        return ReconcileResult(status=None, events=[], requeue_after=None)
    machine: MachineStatus | None = None
    problem: Problem | None = None
    try:
        machine = await _apply(tenant, shim, secrets, node, previous, progress)
    except TranslateError as exc:
        secret = exc.reason in ("SecretNotFound", "InvalidSecret")
        problem = Problem(exc.reason, exc.message, _step(secret))
    except ShimApiError as exc:
        about_source = (exc.error.field or "").startswith("source")
        problem = Problem(
            exc.error.error, exc.error.message, _step(about_source), transient=exc.status >= 500
        )
    except ShimError as exc:
        problem = Problem("ShimUnavailable", str(exc), "MachineReady", transient=True)
    if problem is not None and not problem.transient:
        machine = await _current(shim, tenant.metadata.name)
    now = _utcnow()
    status = compute_status(Observation(tenant, machine, node.name, now, problem), previous)
    events = transition_events(previous, status)
    return ReconcileResult(status, events, requeue_after(tenant, status, now), machine)


def _step(about_source: bool) -> Step:
    return "SourceReady" if about_source else "MachineReady"


async def _current(shim: ShimClient, name: str) -> MachineStatus | None:
    try:
        return await shim.get(name)
    except ShimError:
        return None


async def _apply(
    tenant: Tenant,
    shim: ShimClient,
    secrets: SecretResolver,
    node: Node,
    previous: TenantStatus | None,
    progress: Progress | None,
) -> MachineStatus:
    spec = to_machine_spec(tenant, await load_secrets(tenant, secrets))
    wanted = image_spec(tenant)
    if wanted is not None:
        present = {i.name: i for i in await shim.images()}
        have = present.get(spec.image)
        if have is None or have.sha256 != wanted.sha256:
            await shim.put_image(spec.image, wanted)
    call = asyncio.ensure_future(shim.apply(spec))
    if progress is None:
        return await call
    return await _watch_progress(call, tenant, shim, node, previous, progress)


async def _watch_progress(
    call: asyncio.Future[MachineStatus],
    tenant: Tenant,
    shim: ShimClient,
    node: Node,
    previous: TenantStatus | None,
    progress: Progress,
) -> MachineStatus:
    """While the PUT runs, report the shim's intermediate phases (Starting, Updating) as the
    shim pushes them: a waiting read that it answers when the phase changes."""
    name = tenant.metadata.name
    seen: MachinePhase | None = None
    try:
        while True:
            unless = {p for p in MachinePhase if p not in BUSY or p == seen}
            watch = asyncio.ensure_future(shim.watch(name, unless, WATCH_WAIT))
            either: set[asyncio.Future[Any]] = {call, watch}
            done, _ = await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if call in done:
                watch.cancel()
                return call.result()
            current = None if watch.exception() else watch.result()
            if current is None or current.phase in unless:
                await asyncio.wait({call}, timeout=PROGRESS_RETRY)
                continue
            seen = current.phase
            now = _utcnow()
            await progress(compute_status(Observation(tenant, current, node.name, now), previous))
    finally:
        if not call.done():
            call.cancel()


async def finalize(tenant: Tenant, shim: ShimClient) -> bool:
    """Stop and remove the machine (keeping data if asked). True once it is gone; raises
    ShimError while the shim cannot be asked, so the finalizer stays until it can."""
    name = tenant.metadata.name
    await shim.delete(name, keep_data=tenant.spec.keep_data_on_delete)
    return await shim.get(name) is None
