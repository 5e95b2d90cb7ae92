"""Thin kopf handlers for HostProfiles, over the shared core (hostprofiles.py).

A daemon per profile syncs it on its interval (at once on create, resume and spec change);
the status goes to the profile's status subresource from the node that applied it (its `node`
field says which). No finalizer: every node's operator unmerges the profile's layers when it
sees the delete, and a node a profile stops selecting unmerges them on its next pass.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf
from pydantic import ValidationError

from bitbuilder.operator.api import (
    GROUP,
    HOST_PROFILE_PLURAL,
    VERSION,
    HostProfile,
    HostProfileStatus,
    validation_message,
)
from bitbuilder.operator.hostprofiles import reconcile_profile
from bitbuilder.operator.kubeapi import StatusWriter
from bitbuilder.operator.reconcile import NO_SOURCE_INTERVAL, Node
from bitbuilder.operator.shimclient import ShimClient, ShimError
from bitbuilder.operator.translate import SecretResolver

Logger = logging.Logger | logging.LoggerAdapter[Any]


class HostProfileDriver:
    def __init__(
        self, shim: ShimClient, secrets: SecretResolver, status: StatusWriter, node: Node
    ) -> None:
        self.shim, self.secrets, self.status, self.node = shim, secrets, status, node
        self.wakeups: dict[str, asyncio.Event] = {}
        self.last: dict[str, HostProfileStatus] = {}

    def wake(self, name: str) -> asyncio.Event:
        return self.wakeups.setdefault(name, asyncio.Event())

    async def sync(self, body: kopf.Body, logger: Logger) -> float:
        """One pass; returns when to come back."""
        name = body["metadata"]["name"]
        try:
            profile = HostProfile.from_object(dict(body))
        except ValidationError as exc:
            message = validation_message(exc)
            kopf.event(body, type="Warning", reason="InvalidSpec", message=message)
            logger.error(f"invalid HostProfile: {message}")
            return NO_SOURCE_INTERVAL
        previous = self.last.get(name, profile.status)
        result = await reconcile_profile(
            profile, self.shim, self.secrets, self.node.name, self.node.labels, previous
        )
        if result.status is not None:
            if result.status != previous:
                await self.status.write(name, result.status, HOST_PROFILE_PLURAL)
            self.last[name] = result.status
        for event in result.events:
            kopf.event(body, type=event.type, reason=event.reason, message=event.message)
        return result.requeue_after

    async def poll(self, body: kopf.Body, stopped: Any, logger: Logger) -> None:
        name = body["metadata"]["name"]
        wake = self.wake(name)
        while not stopped:
            wake.clear()
            try:
                delay = await self.sync(body, logger)
            except ShimError as exc:
                logger.warning(f"host shim: {exc}")
                delay = 10.0
            waits = {asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stopped.wait())}
            await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            for waiting in waits:
                waiting.cancel()

    async def remove(self, body: kopf.Body, logger: Logger) -> None:
        name = body["metadata"]["name"]
        if await self.shim.delete_host_layers(name):
            logger.info("host layers unmerged")
        self.wakeups.pop(name, None)
        self.last.pop(name, None)


def register(registry: kopf.OperatorRegistry, driver: HostProfileDriver) -> None:
    profiles = (GROUP, VERSION, HOST_PROFILE_PLURAL)

    async def changed(body: kopf.Body, **_: Any) -> None:
        driver.wake(body["metadata"]["name"]).set()

    async def poll(body: kopf.Body, stopped: Any, logger: Logger, **_: Any) -> None:
        await driver.poll(body, stopped, logger)

    async def remove(body: kopf.Body, logger: Logger, **_: Any) -> None:
        await driver.remove(body, logger)

    kopf.on.update(*profiles, id="changed", field="spec", registry=registry)(changed)
    kopf.on.delete(*profiles, id="unmerge", optional=True, registry=registry)(remove)
    kopf.daemon(*profiles, id="poll", cancellation_timeout=1.0, registry=registry)(poll)
