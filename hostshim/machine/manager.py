"""Desired -> applied for every tenant: idempotent, resumable, one tenant at a time.

The manager owns the state files, the locks and the reads; the work is done by two steps, each
owning one condition of the status: the source step (source_step.py: fetch, verify, check out;
SourceReady) and then the machine step (machine_step.py: start, update, roll back; MachineReady).
A tenant's lock serialises everything that changes it; status reads never wait for a lock.
A source or layout problem never stops a machine: the last good revision keeps running and
the problem is reported in status. A new revision is fetched and validated before the old
machine is stopped.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from bisect import bisect_right
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from bitbuilder.hostshim import safepath
from bitbuilder.hostshim.api import (
    ErrorInfo,
    ImageSpec,
    ImageStatus,
    MachinePhase,
    MachineSpec,
    MachineStatus,
)
from bitbuilder.hostshim.config import ShimConfig
from bitbuilder.hostshim.errors import Conflict, MachineError, NotFound, ShimError
from bitbuilder.hostshim.machine.drift import TreeVerifier
from bitbuilder.hostshim.machine.machine_step import MachineStep
from bitbuilder.hostshim.machine.parts import (
    ImagesLike,
    LayoutLoader,
    MachineInfo,
    RunnerLike,
    SourceFactory,
    TreeCheck,
)
from bitbuilder.hostshim.machine.source_step import SourceStep
from bitbuilder.hostshim.machine.statuscache import CachedStatus, StatusCache
from bitbuilder.hostshim.paths import TenantPaths, checked_name
from bitbuilder.hostshim.state.store import (
    Intent,
    StateError,
    StateStore,
    TenantState,
    machine_hash,
    spec_hash,
)
from bitbuilder.hostshim.timing import phase

log = logging.getLogger(__name__)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _unwatched(name: str) -> None:
    """No one to tell about a change (the manager without a server)."""


def remove_tree(path: Path) -> None:
    """safepath.remove_tree, as a MachineError when something is still mounted below."""
    try:
        safepath.remove_tree(path)
    except safepath.UnsafePath as exc:
        raise MachineError(str(exc), reason="CleanupFailed") from exc


class MachineManager:
    def __init__(
        self,
        config: ShimConfig,
        runner: RunnerLike,
        images: ImagesLike,
        source_for: SourceFactory,
        load_layout: LayoutLoader,
        tree_check: TreeCheck | None = None,
        now: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.config = config
        self.runner = runner
        self.images = images
        self.store = StateStore(config)
        # Called (from the thread doing the work) whenever a tenant's status may have changed.
        self.on_change: Callable[[str], None] = _unwatched
        self._tree_check = tree_check or TreeVerifier()
        self._now = now
        self.sources = SourceStep(config, source_for, load_layout, now)
        self.machine = MachineStep(runner, images, self.sources, self._save, self._phase, now)
        self._states: dict[str, TenantState] = {}
        self._broken: dict[str, StateError] = {}
        self._busy: dict[str, MachinePhase] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._states_guard = threading.Lock()  # the dicts above change while status is read
        self._statuses = StatusCache()

    # --- locking and persistence ----------------------------------------------------------

    def _lock(self, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(name, threading.Lock())

    def _save(self, state: TenantState) -> None:
        self.store.save(state)
        snapshot = state.model_copy(deep=True)
        with self._states_guard:
            self._states[state.name] = snapshot
        self._changed(state.name)

    def _changed(self, name: str) -> None:
        self._statuses.changed(name)
        self.on_change(name)

    def _names(self) -> list[str]:
        with self._states_guard:
            return sorted(self._states)

    def _forget(self, name: str) -> None:
        with self._states_guard:
            self._states.pop(name, None)
            self._broken.pop(name, None)
        self._changed(name)

    @contextmanager
    def _phase(self, name: str, busy: MachinePhase) -> Iterator[None]:
        """Show a transient phase (Starting, Updating) to status readers while work runs."""
        self._busy[name] = busy
        self._changed(name)
        try:
            yield
        finally:
            self._busy.pop(name, None)
            self._changed(name)

    def _stored_state(self, name: str) -> TenantState | None:
        """The last saved state, shared: for reads only (a save replaces it, never changes it).
        A list copied every state deeply: 90% of its time, at any number of tenants."""
        if name in self._broken:
            raise self._broken[name]
        return self._states.get(name)

    def _current_state(self, name: str) -> TenantState | None:
        """The last saved state, to change and save."""
        state = self._stored_state(name)
        return state.model_copy(deep=True) if state is not None else None

    # --- startup ---------------------------------------------------------------------------

    def startup(self) -> None:
        """Load every state and adopt what still runs. Fast: no git, no machine starts."""
        for name in self.store.names():
            try:
                state = self.store.load(name)
            except StateError as exc:
                log.error("tenant %s: %s", name, exc.message)
                self._broken[name] = exc
                continue
            if state is not None:
                self._states[name] = state
        for name in self.runner.adopt():
            if name in self._states or name in self._broken:
                log.info("tenant %s: re-adopted its running machine", name)
            else:
                log.warning("tenant %s: machine runs without state; stopping it", name)
                try:
                    self.runner.stop(name)
                except Exception:  # the shim must come up regardless: it can be retried by hand
                    log.exception("tenant %s: stopping the stateless machine failed", name)

    def resume(self) -> None:
        """Finish half-done work and bring up what should run (after startup())."""
        for name in self._names():
            with self._lock(name):
                state = self._current_state(name)
                if state is None:
                    continue
                try:
                    if state.intent is Intent.delete:
                        self._finish_delete(name, state.keep_data)
                    elif self._needs_reconcile(state):
                        self._reconcile_and_save(state)
                    elif not state.desired.suspend:
                        self.machine.keep_applied_running(state)
                        self._save(state)
                except Exception:
                    log.exception("tenant %s: resuming failed", name)

    @staticmethod
    def _needs_reconcile(state: TenantState) -> bool:
        return (
            state.intent is not None
            or state.applied is None
            or state.applied.spec_hash != state.desired_hash
        )

    # --- apply -----------------------------------------------------------------------------

    def apply(self, spec: MachineSpec) -> MachineStatus:
        """Persist `spec` as desired, then bring the machine to it (synchronously)."""
        with self._lock(spec.name), phase(spec.name, "apply (total)"):
            state = self._current_state(spec.name) or TenantState.new(spec)
            if machine_hash(spec) != machine_hash(state.desired):
                state.machine_error = None  # it was about a machine no longer wanted
            state.desired = spec
            state.desired_hash = spec_hash(spec)
            state.intent = Intent.apply
            self._save(state)
            self._reconcile_and_save(state)
            return self._status_now(state.name)

    def _reconcile_and_save(self, state: TenantState) -> None:
        try:
            self._reconcile(state)
        finally:
            state.intent = None
            self._save(state)

    def _reconcile(self, state: TenantState) -> None:
        if state.desired.suspend:
            self.machine.suspend(state)
            return
        checkout = self.sources.sync(state)
        if state.desired.source is not None and checkout is None:
            self.machine.keep_applied_running(state)
            return
        self.machine.converge(state, checkout)

    # --- reads -----------------------------------------------------------------------------

    def get(self, name: str) -> MachineStatus:
        return self.get_cached(name).status

    def get_cached(self, name: str) -> CachedStatus:
        checked_name(name)
        if name in self._broken:
            raise self._broken[name]
        entry = self._cached(name)
        if entry is None:
            raise NotFound(f"machine {name!r} not found")
        return entry

    def list_machines(self) -> list[MachineStatus]:
        return [entry.status for entry in self.list_page()[0]]

    def list_page(
        self, after: str | None = None, limit: int | None = None
    ) -> tuple[list[CachedStatus], str | None]:
        """The statuses of the tenants named after `after` (in name order), at most `limit`;
        and the name to continue after when more are left (else None)."""
        names = [n for n in self._names() if n not in self._broken]
        rest = names[bisect_right(names, after) :] if after is not None else names
        page = rest[:limit] if limit is not None else rest
        entries = [e for e in map(self._cached, page) if e is not None]
        more = limit is not None and len(rest) > limit
        return entries, page[-1] if more else None

    def _cached(self, name: str) -> CachedStatus | None:
        """The tenant's status, made again only after a change (None: no such tenant)."""
        version = self._statuses.version(name)  # first: see StatusCache.version
        machine = self.runner.inspect(name)
        entry = self._statuses.lookup(name, machine)
        if entry is not None:
            return entry
        state = self._stored_state(name)
        if state is None:
            return None
        return self._statuses.store(name, version, machine, self._status(state, machine))

    def _status_now(self, name: str) -> MachineStatus:
        entry = self._cached(name)
        assert entry is not None, "called with the tenant's lock held, its state saved"
        return entry.status

    def _status(self, state: TenantState, running: MachineInfo | None) -> MachineStatus:
        applied = state.applied
        return MachineStatus(
            name=state.name,
            phase=self._phase_of(state, running is not None),
            runtime=state.desired.runtime,
            spec_hash=state.desired_hash,
            source_revision=state.source_revision,
            applied_revision=applied.commit if applied is not None else None,
            history=state.history,
            leader_pid=running.leader_pid if running is not None else None,
            address=running.address if running is not None else None,
            acceleration=running.acceleration if running is not None else None,
            started_at=running.started_at if running is not None else None,
            source_error=state.source_error,
            machine_error=state.machine_error,
            drift_corrections=state.drift.count,
            last_drift=state.drift.last,
        )

    def _phase_of(self, state: TenantState, running: bool) -> MachinePhase:
        if busy := self._busy.get(state.name):
            return busy
        if running:  # also while suspended, if stopping failed (machineError says why)
            return MachinePhase.running
        if state.desired.suspend:
            return MachinePhase.stopped
        if state.machine_error is not None or state.source_error is not None:
            return MachinePhase.failed
        return MachinePhase.pending

    # --- delete, restart ------------------------------------------------------------------

    def delete(self, name: str, keep_data: bool | None = None) -> None:
        """Stop the machine and remove everything of the tenant's (its data as asked)."""
        checked_name(name)
        with self._lock(name):
            broken = name in self._broken
            state = self._states.get(name)
            if state is None and not broken and self.runner.inspect(name) is None:
                raise NotFound(f"machine {name!r} not found")
            if keep_data is None:
                # Without a readable spec, keep the data: deleting it cannot be undone.
                keep_data = state.desired.keep_data_on_delete if state is not None else True
            if state is not None:
                state = state.model_copy(deep=True)
                state.intent = Intent.delete
                state.keep_data = keep_data
                self._save(state)
            self._finish_delete(name, keep_data)

    def _finish_delete(self, name: str, keep_data: bool) -> None:
        paths = self._paths(name)
        self.runner.stop(name)
        if not keep_data:
            self.runner.remove_data(name)
        self.sources.source(name).remove()
        remove_tree(paths.run)
        if paths.root.is_dir():
            for entry in paths.root.iterdir():
                if entry == paths.state_file or (
                    keep_data and entry in (paths.data, paths.data_image)
                ):
                    continue
                remove_tree(entry)
        self.store.remove(name)  # last: a crash before this resumes the delete at startup
        log.info("tenant %s: deleted%s", name, " (data kept)" if keep_data else "")
        if paths.root.is_dir() and not any(paths.root.iterdir()):
            paths.root.rmdir()
        self._forget(name)

    def restart(self, name: str) -> MachineStatus:
        checked_name(name)
        with self._lock(name):
            state = self._current_state(name)
            if state is None:
                raise NotFound(f"machine {name!r} not found")
            if state.desired.suspend:
                raise Conflict(f"machine {name!r} is suspended; resume it to start it")
            if state.applied is None or not state.applied.running:
                state.intent = Intent.apply
                self._save(state)
                self._reconcile_and_save(state)
                return self._status_now(name)
            self.machine.restart_applied(state, MachinePhase.starting)
            self._save(state)
            return self._status_now(name)

    # --- drift -----------------------------------------------------------------------------

    def check_drift(self) -> list[str]:
        """Correct every tenant whose host state left its applied revision; names corrected.

        A tenant busy with other work is skipped (its lock is held): the next check sees it.
        """
        corrected = []
        for name in self._names():
            lock = self._lock(name)
            if not lock.acquire(blocking=False):
                continue
            try:
                state = self._current_state(name)
                if state is not None and state.intent is None and self._correct_drift(state):
                    corrected.append(name)
            except Exception:
                log.exception("tenant %s: drift check failed", name)
            finally:
                lock.release()
        return corrected

    def _correct_drift(self, state: TenantState) -> bool:
        running = self.runner.inspect(state.name) is not None
        applied = state.applied
        if state.desired.suspend:
            if not running:
                return False
            self.runner.stop(state.name)
            self._record_drift(state, "MachineStopped", "machine ran while suspended; stopped")
            return True
        if applied is None or not applied.running:
            return False
        if applied.commit is not None and (changed := self._tree_changes(state)):
            self._recheckout(state, changed)
            return True
        if running:
            return False
        if self.machine.restart_applied(state, MachinePhase.starting):
            self._record_drift(state, "MachineRestarted", "machine was not running; restarted")
        else:
            assert state.machine_error is not None
            self._record_drift(
                state,
                "MachineRestartFailed",
                f"machine was not running; restarting it failed: {state.machine_error.message}",
            )
        return True

    def _tree_changes(self, state: TenantState) -> list[str]:
        assert state.applied is not None and state.applied.commit is not None
        paths = self._paths(state.name)
        tree = paths.revision(state.applied.commit)
        if not tree.is_dir():
            return ["(revision tree missing)"]
        return self._tree_check(paths.repo, state.applied.commit, tree)

    def _recheckout(self, state: TenantState, changed: list[str]) -> None:
        """The applied revision's tree was modified on the host: check it out fresh, restart."""
        assert state.applied is not None and state.applied.commit is not None
        paths = self._paths(state.name)
        tree = paths.revision(state.applied.commit)
        aside = paths.revisions / f".tampered-{state.applied.commit}-{uuid.uuid4().hex[:8]}"
        if tree.is_dir():
            os.rename(tree, aside)
        self.machine.restart_applied(state, MachinePhase.updating)
        try:
            remove_tree(aside)
        except ShimError as exc:
            log.warning("tenant %s: %s", state.name, exc.message)
        shown = ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
        self._record_drift(
            state,
            "RevisionTreeModified",
            f"files of the applied revision changed on the host ({shown}); checked out again and restarted",
        )

    def _record_drift(self, state: TenantState, reason: str, message: str) -> None:
        log.warning("tenant %s: drift: %s", state.name, message)
        state.drift.count += 1
        revision = state.applied.revision if state.applied is not None else None
        state.drift.last = ErrorInfo(
            reason=reason, message=message, revision=revision, at=self._now()
        )
        self._save(state)

    # --- images ----------------------------------------------------------------------------

    def put_image(self, name: str, spec: ImageSpec) -> ImageStatus:
        return self._with_users(self.images.put(checked_name(name), spec))

    def get_image(self, name: str) -> ImageStatus:
        return self._with_users(self.images.get(checked_name(name)))

    def list_images(self) -> list[ImageStatus]:
        return [self._with_users(image) for image in self.images.list()]

    def delete_image(self, name: str) -> None:
        """Remove an image no tenant names in its desired or applied spec."""
        users = self._image_users(checked_name(name))
        if users:
            raise Conflict(
                f"image {name!r} is used by {', '.join(users)}: change or delete them first",
                reason="ImageInUse",
            )
        self.images.delete(name)

    def _image_users(self, image: str) -> list[str]:
        with self._states_guard:
            states = list(self._states.values())
        return [
            s.name
            for s in states
            if s.desired.image == image or (s.applied is not None and s.applied.spec.image == image)
        ]

    def _with_users(self, status: ImageStatus) -> ImageStatus:
        return status.model_copy(update={"used_by": self._image_users(status.name)})

    # --- helpers ---------------------------------------------------------------------------

    def _paths(self, name: str) -> TenantPaths:
        return TenantPaths(self.config, name)
