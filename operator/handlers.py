"""Thin kopf handlers over the reconcile core (reconcile.py).

Every pass goes through `Driver.sync`: one pass at a time per tenant, the status written to our
own fields on the status subresource (never kopf's per-handler keys: kopf keeps its progress in
annotations), an Event per transition, and the next pass scheduled. A daemon per tenant sleeps
until that time (the source interval with jitter, or a backoff while failing) and syncs again;
create, spec updates, resume and the `bitbuilder.io/reconcile-requested-at` annotation sync at
once; delete keeps the finalizer until the shim confirms the machine is gone.
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
    PLURAL,
    RECONCILE_REQUESTED_ANNOTATION,
    VERSION,
    Tenant,
    TenantPhase,
    TenantStatus,
    validation_message,
)
from bitbuilder.operator.kubeapi import Login, StatusWriter
from bitbuilder.operator.reconcile import (
    NO_SOURCE_INTERVAL,
    Node,
    finalize,
    placed_here,
    reconcile,
)
from bitbuilder.operator.shimclient import ShimClient, ShimError
from bitbuilder.operator.status import invalid_spec_status
from bitbuilder.operator.translate import SecretResolver

KOPF_ANNOTATION_PREFIX = "kopf.bitbuilder.io"
FINALIZE_RETRY = 3.0
OTHER_NODE_RETRY = 10.0
Logger = logging.Logger | logging.LoggerAdapter[Any]


@dataclass
class Schedule:
    """When a tenant's daemon syncs next; `wake` makes it re-read `due`."""

    wake: asyncio.Event
    due: float | None = None


class Driver:
    """The state the handlers share: one lock, one schedule and the last status per tenant."""

    def __init__(
        self,
        shim: ShimClient,
        secrets: SecretResolver,
        status: StatusWriter,
        node: Node,
    ) -> None:
        self.shim, self.secrets, self.status, self.node = shim, secrets, status, node
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
            previous = self.last.get(name, tenant.status)

            async def progress(status: TenantStatus) -> None:
                await self.status.write(name, status)

            result = await reconcile(tenant, self.shim, self.secrets, self.node, previous, progress)
            if result.status is not None and result.status != previous:
                await self.status.write(name, result.status)
            if result.status is not None:
                self.last[name] = result.status
            for event in result.events:
                kopf.event(body, type=event.type, reason=event.reason, message=event.message)
            schedule = self._schedule(name)
            loop = asyncio.get_running_loop()
            schedule.due = (
                None if result.requeue_after is None else loop.time() + result.requeue_after
            )
            schedule.wake.set()

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
        """The finalizer: release it only once the shim says the machine is gone. Every node's
        operator sees the delete; only the node the machine runs on may release the finalizer
        while a machine is reported (the others wait for it)."""
        name = body["metadata"]["name"]
        tenant = Tenant.from_object(dict(body))
        machine = tenant.status.machine if tenant.status is not None else None
        elsewhere = machine.node if machine is not None and machine.node != self.node.name else None
        if not placed_here(tenant, self.node) and (machine is None or elsewhere is not None):
            if elsewhere is not None:
                raise kopf.TemporaryError(
                    f"the machine runs on node {elsewhere}: waiting for it to be removed there",
                    delay=OTHER_NODE_RETRY,
                )
            return
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
            logger.info("machine removed; releasing the finalizer")
        self.locks.pop(name, None)
        self.schedules.pop(name, None)
        self.last.pop(name, None)


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

    kopf.on.create(*tenants, id="sync", registry=registry)(sync)
    kopf.on.resume(*tenants, id="sync", registry=registry)(sync)
    kopf.on.update(*tenants, id="sync", field="spec", registry=registry)(sync)
    annotation = ("metadata", "annotations", RECONCILE_REQUESTED_ANNOTATION)
    kopf.on.field(*tenants, id="requested", field=annotation, registry=registry)(sync)
    kopf.on.delete(*tenants, id="finalize", registry=registry)(remove)
    kopf.daemon(*tenants, id="poll", cancellation_timeout=1.0, registry=registry)(poll)
    kopf.on.cleanup(registry=registry)(close)
    host = hostprofile_handlers.HostProfileDriver(
        driver.shim, driver.secrets, driver.status, driver.node
    )
    hostprofile_handlers.register(registry, host)
    return registry


def run_operator(
    registry: kopf.OperatorRegistry,
    *,
    namespaces: list[str] | None = None,
    liveness: str | None = None,
    stop_flag: Any = None,
    ready_flag: Any = None,
) -> None:
    """kopf.run with our defaults: standalone (no peering), cluster-wide unless namespaces."""
    kopf.run(
        registry=registry,
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces or (),
        liveness_endpoint=liveness,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )
