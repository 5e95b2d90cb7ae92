"""Standalone mode (`bitbuilder run`): the fleet repo drives the local host shim, no cluster.

One task follows the fleet (its head every --fleet-interval, or at once when a webhook says it
moved); one worker per tenant reconciles it through the same core as the kopf operator, on its
own timer (spec.source.interval with jitter, backoff while failing), and wakes early when its
manifest changes or a webhook names its repo. A tenant that leaves the fleet has its machine
removed, but only if this reconciler created it (see localstate.py). A broken manifest is
reported and skipped; the tenant it names keeps its last good state.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Iterable
from pathlib import Path

from bitbuilder.hostshim.api import parse_duration
from bitbuilder.operator.api import Tenant, TenantStatus
from bitbuilder.operator.fleet import Fleet, FleetError, FleetSnapshot, open_fleet
from bitbuilder.operator.hostfollow import HostProfileFollower
from bitbuilder.operator.localstate import (
    DEFAULT_STATE_DIR,
    FleetRecord,
    LocalState,
    observe,
    utcnow,
)
from bitbuilder.operator.reconcile import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    Node,
    finalize,
    interval,
    jittered,
    placed_here,
    reconcile,
)
from bitbuilder.operator.shimclient import DEFAULT_SOCKET, ShimClient, ShimError
from bitbuilder.operator.status import Event
from bitbuilder.operator.translate import (
    FileSecrets,
    SecretResolver,
    TranslateError,
    credentials_from_secret,
    verify_from_secret,
)
from bitbuilder.operator.webhook import WebhookError, same_repo, start_webhook

log = logging.getLogger("bitbuilder.standalone")


class Standalone:
    def __init__(
        self,
        fleet: Fleet,
        shim: ShimClient,
        secrets: SecretResolver,
        node: Node,
        state: LocalState,
        fleet_interval: float = 30.0,
        concurrency: int = 4,
    ) -> None:
        self.fleet = fleet
        self.shim = shim
        self.secrets = secrets
        self.node = node
        self.state = state
        self.fleet_interval = fleet_interval
        self.desired: dict[str, Tenant] = {}
        self.workers: dict[str, asyncio.Task[None]] = {}
        self.wakeups: dict[str, asyncio.Event] = {}
        self.fleet_wakeup = asyncio.Event()
        self.limit = asyncio.Semaphore(concurrency)
        self.snapshot: FleetSnapshot | None = None
        self.host = HostProfileFollower(shim, secrets, node)

    # --- the fleet ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the fleet until `stop` is set. Machines keep running after that."""
        host = asyncio.create_task(self.host.run(stop), name="host-profiles")
        try:
            while not stop.is_set():
                await self.refresh_fleet()
                await _wait_any(self.fleet_wakeup, stop, timeout=jittered(self.fleet_interval))
                self.fleet_wakeup.clear()
        finally:
            tasks = [host, *self.workers.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def refresh_fleet(self) -> FleetSnapshot | None:
        record = FleetRecord(source=self.fleet.url, checked=utcnow())
        try:
            head = await asyncio.to_thread(self.fleet.head)
            if self.snapshot is not None and head == self.snapshot.revision:
                snapshot = self.snapshot  # unchanged: no fetch, no parsing
            else:
                snapshot = await asyncio.to_thread(self.fleet.snapshot, head)
        except FleetError as exc:
            # Keep everything as it is: an unreachable fleet is not an empty fleet.
            log.error("fleet: %s", exc)
            old = self.state.load_fleet()
            self.state.save_fleet(
                record.model_copy(update={"error": str(exc), "revision": old and old.revision})
            )
            return None
        if self.snapshot is None or snapshot.revision != self.snapshot.revision:
            log.info(
                "fleet %s at %s: %d tenants",
                self.fleet.url,
                snapshot.revision,
                len(snapshot.tenants),
            )
            for problem in snapshot.problems:
                log.error("fleet: skipped %s", problem)
        self.snapshot = snapshot
        self.state.save_fleet(
            record.model_copy(
                update={
                    "revision": snapshot.revision,
                    "problems": [str(p) for p in snapshot.problems],
                }
            )
        )
        self._apply(snapshot)
        return snapshot

    def _apply(self, snapshot: FleetSnapshot) -> None:
        self.host.update(snapshot)
        for name, tenant in snapshot.tenants.items():
            if self.desired.get(name) != tenant:
                self.desired[name] = tenant
                self._wake(name)
        if not snapshot.complete:
            return  # a manifest could not be read: which tenants left the fleet is unknown
        keep = set(snapshot.tenants) | snapshot.broken_names
        for name in (set(self.desired) | set(self.state.names())) - keep:
            if self.desired.pop(name, None) is not None or name not in self.workers:
                log.info("%s: left the fleet, removing its machine", name)
                self._wake(name)

    def _wake(self, name: str) -> None:
        self.wakeups.setdefault(name, asyncio.Event()).set()
        task = self.workers.get(name)
        if task is None or task.done():
            self.workers[name] = asyncio.create_task(self._worker(name), name=f"tenant-{name}")

    # --- triggers (webhook) -------------------------------------------------------------------

    def trigger(self, names: Iterable[str]) -> list[str]:
        """Reconcile these tenants now; returns those that are known."""
        known = [n for n in names if n in self.desired]
        for name in known:
            self._wake(name)
        return known

    async def trigger_url(self, url: str) -> list[str]:
        """A push to `url`: the fleet and every tenant whose source is that repo."""
        hits = []
        if same_repo(url, self.fleet.url):
            self.fleet_wakeup.set()
            hits.append("(fleet)")
        tenants = [
            n
            for n, t in self.desired.items()
            if t.spec.source and same_repo(url, t.spec.source.url)
        ]
        return hits + self.trigger(tenants)

    # --- one worker per tenant ----------------------------------------------------------------

    async def _worker(self, name: str) -> None:
        delay = 0.0
        failures = 0
        while True:
            wake = self.wakeups.setdefault(name, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=delay)
            wake.clear()
            try:
                async with self.limit:
                    tenant = self.desired.get(name)
                    if tenant is None:
                        if await self._remove(name):
                            return
                        delay = jittered(BACKOFF_MIN)  # still there: ask again shortly
                        continue
                    delay = await self._reconcile(name, tenant)
                failures = 0
            except Exception as exc:  # even a bug must not stop this tenant's worker for good
                failures += 1
                delay = jittered(min(BACKOFF_MAX, BACKOFF_MIN * 2**failures))
                expected = isinstance(exc, ShimError | OSError)
                log.warning("%s: %s (retry in %.0fs)", name, exc, delay, exc_info=not expected)

    async def _reconcile(self, name: str, tenant: Tenant) -> float:
        owned = self.state.load(name)
        if owned is None and not placed_here(tenant, self.node):
            return interval(tenant)  # another node's tenant, never ran here: nothing to do
        record = observe(owned, tenant, utcnow())
        self.state.save(record)  # before the first PUT: from now on the machine is ours

        async def progress(status: TenantStatus) -> None:
            self.state.save(record.model_copy(update={"status": status}))

        result = await reconcile(
            record.tenant(), self.shim, self.secrets, self.node, record.status, progress
        )
        if result.status is None:
            log.info("%s: placed on another node; stopped here", name)
            self.state.remove(name)
            return interval(tenant)
        self.state.save(record.model_copy(update={"status": result.status}))
        _log_events(name, result.events)
        return result.requeue_after or interval(tenant)

    async def _remove(self, name: str) -> bool:
        """True once the machine is gone (and this tenant forgotten)."""
        record = self.state.load(name)
        if record is not None:
            if not await finalize(record.tenant(), self.shim):
                return False
            self.state.remove(name)
            log.info("%s: machine removed", name)
        if name in self.desired:  # came back while we were removing it
            return False
        self.workers.pop(name, None)
        self.wakeups.pop(name, None)
        return True


def _log_events(name: str, events: list[Event]) -> None:
    for event in events:
        level = logging.WARNING if event.type == "Warning" else logging.INFO
        log.log(level, "%s: %s: %s", name, event.reason, event.message)


async def _wait_any(*events: asyncio.Event, timeout: float) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


# --- the command --------------------------------------------------------------------------------


def parse_labels(pairs: list[str]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--node-label wants key=value, got {pair!r}")
        labels[key] = value
    return labels


async def run_standalone(args: argparse.Namespace, stop: asyncio.Event) -> None:
    """Raises StartupError for what the command line got wrong."""
    state = LocalState(args.state_dir)
    with state.lock():
        await _run_locked(args, state, stop)


async def _run_locked(args: argparse.Namespace, state: LocalState, stop: asyncio.Event) -> None:
    secrets = FileSecrets(args.secrets_dir)
    credentials = verify = None
    if args.fleet_secret:
        data = await secrets.read(args.fleet_secret)
        credentials = credentials_from_secret(data, args.fleet_secret)
    if args.fleet_verify:
        verify = verify_from_secret(await secrets.read(args.fleet_verify), args.fleet_verify)
    fleet = open_fleet(
        args.fleet,
        args.state_dir / "fleet",
        args.fleet_branch,
        args.fleet_path,
        credentials,
        verify,
    )
    node = Node(args.node, parse_labels(args.node_label))
    async with ShimClient(args.socket) as shim:
        driver = Standalone(fleet, shim, secrets, node, state, args.fleet_interval)
        webhook = None
        if args.webhook_listen:
            webhook = await start_webhook(args.webhook_listen, args.webhook_secret_file, driver)
        try:
            await driver.run(stop)
        finally:
            if webhook is not None:
                await webhook.cleanup()


StartupError = (TranslateError, FleetError, WebhookError, OSError)


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_standalone(args, stop)

    try:
        asyncio.run(main())
    except StartupError as exc:
        log.error("cannot run: %s", exc)
        return 2
    return 0


def _seconds(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`bitbuilder run`: standalone mode."""
    parser = commands.add_parser(
        "run",
        help="run tenants from a fleet repo on this host (no Kubernetes)",
        description="Reconcile the Tenant manifests of a fleet git repo or folder through the "
        "local host shim, and follow the fleet as tenants are added, changed and removed.",
    )
    parser.add_argument("--fleet", required=True, help="fleet git URL or folder")
    parser.add_argument(
        "--fleet-branch", default="main", help="branch of a fleet git repo (default: %(default)s)"
    )
    parser.add_argument(
        "--fleet-path", default="", help="folder inside the fleet to read (default: its root)"
    )
    parser.add_argument(
        "--fleet-interval", type=_seconds, default=30.0, help="how often to check the fleet (30s)"
    )
    parser.add_argument(
        "--secrets-dir", type=Path, help="secretRefs: <dir>/<name>/<key> files (default: none)"
    )
    parser.add_argument(
        "--fleet-secret", metavar="NAME", help="https credentials for the fleet repo (a secret)"
    )
    parser.add_argument(
        "--fleet-verify",
        metavar="NAME",
        help="only fleet commits signed by the keys in this secret ('*.pub', '*.asc')",
    )
    parser.add_argument(
        "--socket",
        type=Path,
        default=DEFAULT_SOCKET,
        help="host shim socket (default: %(default)s)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="this reconciler's state (default: %(default)s)",
    )
    parser.add_argument(
        "--node", default=os.uname().nodename, help="this node's name (default: %(default)s)"
    )
    parser.add_argument(
        "--node-label", action="append", default=[], metavar="KEY=VALUE", help="for nodeSelector"
    )
    parser.add_argument(
        "--webhook-listen", metavar="HOST:PORT", help="serve push webhooks (e.g. 127.0.0.1:9292)"
    )
    parser.add_argument("--webhook-secret-file", type=Path, help="the webhook's shared HMAC secret")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.set_defaults(handler=_run)
