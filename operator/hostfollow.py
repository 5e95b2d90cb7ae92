"""Standalone mode's HostProfiles: the fleet's profiles that select this node, on this host.

One task for all of them (a host has a few): each pass reconciles every profile through the
shared core (hostprofiles.py) and sleeps until the soonest is due again, or until the fleet
changes. Layers the shim holds for a profile that left the fleet are unmerged, but never
while a fleet file cannot be read, and never a profile whose manifest is broken.
"""

from __future__ import annotations

import asyncio
import logging

from bitbuilder.operator.api import HostProfile, HostProfileStatus
from bitbuilder.operator.fleet import FleetSnapshot
from bitbuilder.operator.hostprofiles import reconcile_profile
from bitbuilder.operator.reconcile import BACKOFF_MAX, NO_SOURCE_INTERVAL, Node, jittered
from bitbuilder.operator.shimclient import ShimClient, ShimError
from bitbuilder.operator.translate import SecretResolver

log = logging.getLogger("bitbuilder.standalone.host")


class HostProfileFollower:
    def __init__(self, shim: ShimClient, secrets: SecretResolver, node: Node) -> None:
        self.shim, self.secrets, self.node = shim, secrets, node
        self.desired: dict[str, HostProfile] = {}
        self.statuses: dict[str, HostProfileStatus] = {}
        self.keep: set[str] = set()  # broken manifests: their layers stay as they are
        self.complete = False  # every fleet file was read: a missing profile has left
        self.wake = asyncio.Event()

    def update(self, snapshot: FleetSnapshot) -> None:
        """The fleet moved: follow its profiles (at once, if they changed)."""
        if snapshot.host_profiles != self.desired or not self.complete:
            self.wake.set()
        self.desired = dict(snapshot.host_profiles)
        self.keep = snapshot.broken_profiles
        self.complete = snapshot.complete

    async def run(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            self.wake.clear()
            try:
                delay = await self.sync_all()
                failures = 0
            except ShimError as exc:
                failures += 1
                delay = jittered(min(BACKOFF_MAX, 2.0 * 2**failures))
                log.warning("host profiles: %s (retry in %.0fs)", exc, delay)
            waits = [asyncio.ensure_future(e.wait()) for e in (self.wake, stop)]
            await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            for waiting in waits:
                waiting.cancel()

    async def sync_all(self) -> float:
        """One pass over every profile; returns when the next is due."""
        delays = [NO_SOURCE_INTERVAL]
        for name, profile in sorted(self.desired.items()):
            result = await reconcile_profile(
                profile, self.shim, self.secrets, self.node.name, self.node.labels,
                self.statuses.get(name),
            )  # fmt: skip
            delays.append(result.requeue_after)
            if result.status is None:
                self.statuses.pop(name, None)
                continue
            self.statuses[name] = result.status
            for event in result.events:
                level = logging.WARNING if event.type == "Warning" else logging.INFO
                log.log(level, "hostprofile %s: %s: %s", name, event.reason, event.message)
        if self.complete:
            for layers in await self.shim.host_layers():
                if layers.name not in self.desired and layers.name not in self.keep:
                    log.info("hostprofile %s: left the fleet, unmerging its layers", layers.name)
                    await self.shim.delete_host_layers(layers.name)
                    self.statuses.pop(layers.name, None)
        return min(delays)
