"""Thin kopf handlers over the reconcile core (reconcile.py) and placement (placement.py).

Every pass goes through `Driver.sync`: one pass at a time per tenant, placement first (the
tenant's reservation pod, bound by kube-scheduler, says whether it runs on this node; a pod
event wakes the tenant's pass), then the status written to our
own fields on the status subresource (never kopf's per-handler keys: kopf keeps its progress in
annotations), an Event per transition, and the next pass scheduled. A daemon per tenant sleeps
until that time (the source interval with jitter, or a backoff while failing) and syncs again;
create, spec updates, resume and the `bitbuilder.io/reconcile-requested-at` annotation sync at
once; delete keeps the finalizer until the node running the machine confirms it is gone (or
that node no longer exists). At start-up, before any tenant, copies this node no longer owns
are stopped.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError

from bitbuilder.operator import hostprofile_handlers
from bitbuilder.operator.api import (
    FINALIZER,
    GROUP,
    OPERATOR_NAMESPACE,
    PLURAL,
    RECONCILE_REQUESTED_ANNOTATION,
    VERSION,
    Tenant,
    TenantPhase,
    TenantStatus,
    validation_message,
)
from bitbuilder.operator.kubeapi import Login, StatusWriter
from bitbuilder.operator.placement import (
    TENANT_LABEL,
    Pods,
    Reservation,
    Verdict,
    decide,
    live_pod,
    next_serial,
    pin_for,
    reservation_pod,
)
from bitbuilder.operator.reconcile import NO_SOURCE_INTERVAL, Node, finalize, interval, reconcile
from bitbuilder.operator.shimclient import ShimClient, ShimError
from bitbuilder.operator.status import invalid_spec_status, unplaced_status
from bitbuilder.operator.translate import SecretResolver

KOPF_ANNOTATION_PREFIX = "kopf.bitbuilder.io"
FINALIZE_RETRY = 3.0
OTHER_NODE_RETRY = 10.0
HOLDER_RETRY = 2.0  # waiting for another node to stop its copy: nothing else says when
Logger = logging.Logger | logging.LoggerAdapter[Any]


@dataclass
class Schedule:
    """When a tenant's daemon syncs next; `wake` makes it re-read `due`."""

    wake: asyncio.Event
    due: float | None = None
    nudged: bool = False  # a pod event during a pass: that pass's answer may be stale


class Driver:
    """The state the handlers share: one lock, one schedule and the last status per tenant."""

    def __init__(
        self,
        shim: ShimClient,
        secrets: SecretResolver,
        status: StatusWriter,
        node: Node,
        pods: Pods,
    ) -> None:
        self.shim, self.secrets, self.status, self.node = shim, secrets, status, node
        self.pods = pods
        self.locks: dict[str, asyncio.Lock] = {}
        self.schedules: dict[str, Schedule] = {}
        self.last: dict[str, TenantStatus] = {}

    def _schedule(self, name: str) -> Schedule:
        return self.schedules.setdefault(name, Schedule(asyncio.Event()))

    async def sync(self, body: kopf.Body, logger: Logger) -> None:
        name = body["metadata"]["name"]
        async with self.locks.setdefault(name, asyncio.Lock()):
            try:
                tenant = Tenant.from_object(dict(body))
            except ValidationError as exc:
                message = validation_message(exc)
                kopf.event(body, type="Warning", reason="InvalidSpec", message=message)
                logger.error(f"invalid Tenant: {message}")
                await self.status.write(name, invalid_status(body, message))
                return
            if body["metadata"].get("deletionTimestamp"):
                return  # being deleted: only the finalizer acts now (no pod, no machine)
            self._schedule(name).nudged = False
            verdict = await self._place(tenant, body)
            if verdict.run:
                requeue = await self._run(tenant, body)
            else:
                requeue = await self._stand_by(tenant, body, verdict)
            schedule = self._schedule(name)
            loop = asyncio.get_running_loop()
            if schedule.nudged:
                requeue = 0.0
            schedule.due = None if requeue is None else loop.time() + requeue
            schedule.wake.set()

    async def _place(self, tenant: Tenant, body: kopf.Body) -> Verdict:
        """Keep the tenant's reservation pod and read what it says for this node."""
        name, me = tenant.metadata.name, self.node.name
        machine = tenant.status.machine if tenant.status is not None else None
        holder = machine.node if machine is not None else None
        pods = await self.pods.of(name)
        pod = live_pod(pods)
        if pod is None:
            pin, serial = pin_for(tenant, holder), next_serial(pods)
            pod = await self.pods.create(
                reservation_pod(tenant, body["metadata"]["uid"], pin, serial)
            )
        reservation = Reservation.from_pod(pod)
        lost = (
            reservation.node == me
            and holder not in (None, me)
            and await self.pods.node_lost(str(holder))
        )
        verdict = decide(tenant, reservation, me, holder, lost)
        if verdict.replace:  # stop here first, then let the pod go: never two copies
            await self._stop_copy(name, holder)
            await self.pods.delete(reservation.name, reservation.uid)
        return verdict

    async def _stop_copy(self, name: str, holder: str | None) -> None:
        """Stop (and forget) this node's copy, keeping its data; then no longer hold it."""
        await self.shim.delete(name, keep_data=True)
        self.last.pop(name, None)
        if holder == self.node.name:
            await self.status.release_holder(name, holder)

    async def _run(self, tenant: Tenant, body: kopf.Body) -> float | None:
        name = tenant.metadata.name
        previous = self.last.get(name, tenant.status)

        async def progress(status: TenantStatus) -> None:
            await self.status.write(name, status)

        result = await reconcile(
            tenant, self.shim, self.secrets, self.node, previous, progress, placed=True
        )
        if result.status is not None and result.status != previous:
            await self.status.write(name, result.status)
        if result.status is not None:
            self.last[name] = result.status
        for event in result.events:
            kopf.event(body, type=event.type, reason=event.reason, message=event.message)
        return result.requeue_after

    async def _stand_by(self, tenant: Tenant, body: kopf.Body, verdict: Verdict) -> float | None:
        """Not run here: stop any copy; report why it runs nowhere, if this node is to say."""
        name = tenant.metadata.name
        machine = tenant.status.machine if tenant.status is not None else None
        if not verdict.replace:
            await self._stop_copy(name, machine.node if machine is not None else None)
        if verdict.reason is None:
            return interval(tenant)
        now = datetime.now(UTC)
        status = unplaced_status(tenant, verdict.reason, verdict.message, verdict.stalled, now)
        if status != tenant.status:
            await self.status.write_waiting(name, status)
            kind = "Warning" if verdict.stalled else "Normal"
            kopf.event(body, type=kind, reason=verdict.reason, message=verdict.message)
        return HOLDER_RETRY if verdict.reason == "WaitingForNode" else interval(tenant)

    def nudge(self, name: str) -> None:
        """A pod event: the tenant's daemon syncs now (unless it has none: gone, or its first
        pass is still to come)."""
        schedule = self.schedules.get(name)
        if schedule is None:
            return
        schedule.due = asyncio.get_running_loop().time()
        schedule.nudged = True
        schedule.wake.set()

    async def stop_strays(self, logger: Logger) -> None:
        """Start-up, before any tenant: stop the copies whose pod is not bound to this node
        (it was lost and the tenant placed elsewhere meanwhile, or the tenant is gone)."""
        pods = await self.pods.list()
        owned = {
            p["metadata"]["labels"][TENANT_LABEL]
            for p in pods
            if (p.get("spec") or {}).get("nodeName") == self.node.name
            and not p["metadata"].get("deletionTimestamp")
        }
        try:
            for machine in await self.shim.machines():
                if machine.name not in owned:
                    logger.warning(f"{machine.name}: not placed on this node; stopping its copy")
                    await self.shim.delete(machine.name, keep_data=True)
        except ShimError as exc:  # each tenant's own pass stops its copy once the shim answers
            logger.warning(f"cannot ask the host shim for stray machines: {exc}")

    async def poll(self, body: kopf.Body, stopped: Any, logger: Logger) -> None:
        """The per-tenant daemon: sync whenever the schedule says so, until kopf stops it."""
        schedule = self._schedule(body["metadata"]["name"])
        while not stopped:
            loop = asyncio.get_running_loop()
            # Until the first handler pass has scheduled us, wait for it (or a long while).
            delay = NO_SOURCE_INTERVAL if schedule.due is None else schedule.due - loop.time()
            if delay > 0:
                waits = {
                    asyncio.ensure_future(schedule.wake.wait()),
                    asyncio.ensure_future(stopped.wait()),
                }
                await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
                for waiting in waits:
                    waiting.cancel()
                if schedule.wake.is_set() or stopped:
                    schedule.wake.clear()
                    continue
            await self.sync(body, logger)

    async def remove(self, body: kopf.Body, logger: Logger) -> None:
        """The finalizer: every node's operator sees the delete and removes its own copy; it is
        released only when no other node may still run the machine (the pod's node and the
        holder have removed it, or no longer exist or report Ready)."""
        name, me = body["metadata"]["name"], self.node.name
        tenant = Tenant.from_object(dict(body))
        machine = tenant.status.machine if tenant.status is not None else None
        pods = await self.pods.of(name)  # terminating ones too: their node may still run it
        nodes = {Reservation.from_pod(pod).node for pod in pods}
        nodes.add(machine.node if machine is not None else None)
        try:
            here = me in nodes or await self.shim.get(name) is not None
        except ShimError as exc:
            raise kopf.TemporaryError(
                f"cannot ask the host shim: {exc}", delay=FINALIZE_RETRY
            ) from exc
        if here:
            await self._finalize_here(tenant, body, logger)
        for node in sorted(n for n in nodes if n not in (None, me)):
            if not await self.pods.node_lost(node):
                raise kopf.TemporaryError(
                    f"the machine runs on node {node}: waiting for it to be removed there",
                    delay=OTHER_NODE_RETRY,
                )
        self.locks.pop(name, None)
        self.schedules.pop(name, None)
        self.last.pop(name, None)

    async def _finalize_here(self, tenant: Tenant, body: kopf.Body, logger: Logger) -> None:
        name = tenant.metadata.name
        async with self.locks.setdefault(name, asyncio.Lock()):
            last = self.last.get(name) or TenantStatus.model_validate(body.get("status") or {})
            if last.phase is not TenantPhase.terminating:
                terminating = last.model_copy(update={"phase": TenantPhase.terminating})
                await self.status.write(name, terminating)
                self.last[name] = terminating
                kopf.event(
                    body, type="Normal", reason="Terminating", message="removing the machine"
                )
            try:
                gone = await finalize(tenant, self.shim)
            except ShimError as exc:
                kopf.event(body, type="Warning", reason="ShimUnavailable", message=str(exc))
                raise kopf.TemporaryError(
                    f"cannot remove the machine: {exc}", delay=FINALIZE_RETRY
                ) from exc
            if not gone:
                raise kopf.TemporaryError(
                    "the machine is still being removed", delay=FINALIZE_RETRY
                )
            kopf.event(
                body, type="Normal", reason="MachineRemoved", message="machine stopped and removed"
            )
            logger.info("machine removed")
            await self.status.release_holder(name, self.node.name)


def invalid_status(body: kopf.Body, message: str) -> TenantStatus:
    """Stalled/InvalidSpec on top of the last status (which may itself be unreadable)."""
    try:
        previous = TenantStatus.model_validate(body.get("status") or {})
    except ValidationError:
        previous = TenantStatus()
    generation = body["metadata"].get("generation")
    return invalid_spec_status(previous, message, generation, datetime.now(UTC))


def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Our finalizer; kopf's bookkeeping in annotations (not in .status, where it would clutter
    the printer columns); only warnings as kopf's own Events (ours carry the transitions)."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=KOPF_ANNOTATION_PREFIX
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=KOPF_ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.peering.standalone = True


def build_registry(driver: Driver, login: Login) -> kopf.OperatorRegistry:
    """The handlers, registered on a registry of their own (so tests can run several)."""
    registry = kopf.OperatorRegistry()
    tenants = (GROUP, VERSION, PLURAL)
    kopf.on.startup(registry=registry)(configure)
    kopf.on.login(registry=registry)(login)

    async def sync(body: kopf.Body, logger: Logger, **_: Any) -> None:
        await driver.sync(body, logger)

    async def poll(body: kopf.Body, stopped: Any, logger: Logger, **_: Any) -> None:
        await driver.poll(body, stopped, logger)

    async def remove(body: kopf.Body, logger: Logger, **_: Any) -> None:
        await driver.remove(body, logger)

    async def close(**_: Any) -> None:
        await driver.shim.close()

    async def strays(logger: Logger, **_: Any) -> None:
        await driver.stop_strays(logger)

    async def pod_event(labels: kopf.Labels, **_: Any) -> None:
        driver.nudge(labels[TENANT_LABEL])

    kopf.on.create(*tenants, id="sync", registry=registry)(sync)
    kopf.on.resume(*tenants, id="sync", registry=registry)(sync)
    kopf.on.update(*tenants, id="sync", field="spec", registry=registry)(sync)
    annotation = ("metadata", "annotations", RECONCILE_REQUESTED_ANNOTATION)
    kopf.on.field(*tenants, id="requested", field=annotation, registry=registry)(sync)
    kopf.on.delete(*tenants, id="finalize", registry=registry)(remove)
    kopf.daemon(*tenants, id="poll", cancellation_timeout=1.0, registry=registry)(poll)
    kopf.on.startup(registry=registry)(strays)
    kopf.on.cleanup(registry=registry)(close)
    labels = {TENANT_LABEL: kopf.PRESENT}
    kopf.on.event("", "v1", "pods", id="placement", labels=labels, registry=registry)(pod_event)
    host = hostprofile_handlers.HostProfileDriver(
        driver.shim, driver.secrets, driver.status, driver.node
    )
    hostprofile_handlers.register(registry, host)
    return registry


def run_operator(
    registry: kopf.OperatorRegistry,
    *,
    namespace: str = OPERATOR_NAMESPACE,
    liveness: str | None = None,
    stop_flag: Any = None,
    ready_flag: Any = None,
) -> None:
    """kopf.run with our defaults: standalone (no peering); Tenants (cluster-scoped) everywhere,
    pods only in the operator's namespace (so no cluster-wide pod access is needed)."""
    kopf.run(
        registry=registry,
        standalone=True,
        namespaces=[namespace],
        liveness_endpoint=liveness,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )
