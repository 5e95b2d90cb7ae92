"""The machine step: the desired spec running at the source step's revision, or why not.

It alone sets what status reports as MachineReady (machineError and the applied state, with
the target being started and the one that failed). The new revision was checked out and
validated by the source step before anything here runs; here a start bound to fail (a runtime
or image this host cannot give) is refused before the running machine is stopped, and a start
that fails brings the previous applied machine back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager

from bitbuilder.hostshim.api import MachinePhase
from bitbuilder.hostshim.errors import ShimError
from bitbuilder.hostshim.machine.parts import Clock, ImagesLike, MachineInfo, RunnerLike, error_info
from bitbuilder.hostshim.machine.runner import check_image, check_spec
from bitbuilder.hostshim.machine.source_step import SourceStep
from bitbuilder.hostshim.source.git import Checkout
from bitbuilder.hostshim.state.store import AppliedState, TenantState, machine_hash, spec_hash

log = logging.getLogger(__name__)

Busy = Callable[[str, MachinePhase], AbstractContextManager[None]]


class MachineStep:
    def __init__(
        self,
        runner: RunnerLike,
        images: ImagesLike,
        sources: SourceStep,
        save: Callable[[TenantState], None],
        busy: Busy,
        now: Clock,
    ) -> None:
        self.runner = runner
        self.images = images
        self.sources = sources
        self._save = save
        self._busy = busy  # shows Starting/Updating to status readers while work runs
        self._now = now

    def converge(self, state: TenantState, checkout: Checkout | None) -> None:
        """Start or update the machine to (desired spec, checkout); roll back if that fails."""
        spec = state.desired
        target = f"{checkout.commit if checkout else None}:{machine_hash(spec)}"
        running = self.runner.inspect(spec.name)
        if running is not None and self._runs_target(state, target, running, checkout):
            self._record_applied(state, checkout)
            return
        if running is not None and state.failed_target == target:
            return  # this exact target failed before; the previous machine keeps running
        # Persisted before acting: a crash after the start is recognised at the next start.
        state.starting = target
        self._save(state)
        try:
            if self._replace(state, checkout, target, running is not None):
                self._record_applied(state, checkout)
        finally:
            state.starting = None

    def suspend(self, state: TenantState) -> None:
        if self.runner.inspect(state.name) is not None:
            log.info("tenant %s: suspending", state.name)
        try:
            self.runner.stop(state.name)
        except Exception as exc:
            state.machine_error = error_info(exc, self._now())
            return
        if state.applied is not None:
            state.applied.running = False
        state.machine_error = None

    def keep_applied_running(self, state: TenantState) -> None:
        """Keep (or bring back) the last good machine: the desired one cannot be built now."""
        applied = state.applied
        if applied is None or self.runner.inspect(state.name) is not None:
            return
        try:
            self.start_applied(state)
            applied.running = True
        except Exception as exc:
            state.machine_error = error_info(exc, self._now(), applied.revision)

    def start_applied(self, state: TenantState) -> None:
        """(Re)start the machine exactly as last applied: same spec, same revision tree."""
        applied = state.applied
        assert applied is not None
        checkout = self.sources.applied_checkout(state)
        self.runner.stop(state.name)
        self.runner.start(applied.spec, checkout)

    def restart_applied(self, state: TenantState, phase: MachinePhase) -> bool:
        """start_applied showing `phase` meanwhile; a failure becomes the machineError."""
        assert state.applied is not None
        with self._busy(state.name, phase):
            try:
                self.start_applied(state)
            except Exception as exc:
                state.machine_error = error_info(exc, self._now(), state.applied.revision)
                return False
            state.machine_error = None
            return True

    def _runs_target(
        self, state: TenantState, target: str, running: MachineInfo, checkout: Checkout | None
    ) -> bool:
        applied = state.applied
        if applied is not None and applied.running and target == applied.target:
            return True
        # The shim died after starting this very target, before recording it as applied.
        revision = checkout.revision if checkout is not None else None
        return state.starting == target and running.revision == revision

    def _replace(
        self, state: TenantState, checkout: Checkout | None, target: str, running: bool
    ) -> bool:
        """Stop what runs, start the target; False (and status says why) if that failed."""
        name = state.name
        revision = checkout.revision if checkout else None
        try:  # a start bound to fail must not stop what runs
            check_spec(state.desired)
            check_image(state.desired, self.images.get(state.desired.image))
        except ShimError as exc:
            state.machine_error = error_info(exc, self._now(), revision)
            state.failed_target = target
            log.warning("tenant %s: cannot start: %s", name, state.machine_error.message)
            return False
        with self._busy(name, MachinePhase.updating if running else MachinePhase.starting):
            try:
                if running:
                    self.runner.stop(name)
            except Exception as exc:
                # The old machine still runs; the target is not known to be bad: retried later.
                state.machine_error = error_info(
                    exc, self._now(), state.applied.revision if state.applied else None
                )
                log.warning("tenant %s: stop failed: %s", name, state.machine_error.message)
                return False
            try:
                self.runner.start(state.desired, checkout)
            except Exception as exc:
                state.machine_error = error_info(exc, self._now(), revision)
                state.failed_target = target
                log.warning("tenant %s: start failed: %s", name, state.machine_error.message)
                if running:
                    self._rollback(state)
                return False
        return True

    def _record_applied(self, state: TenantState, checkout: Checkout | None) -> None:
        """What is desired is what runs now."""
        spec, previous = state.desired, state.applied
        applied = AppliedState(
            spec=spec,
            spec_hash=spec_hash(spec),
            machine_hash=machine_hash(spec),
            commit=checkout.commit if checkout is not None else None,
            ref=checkout.ref if checkout is not None else None,
            running=True,
            at=self._now(),
        )
        unchanged = previous is not None and previous.running and previous.target == applied.target
        if unchanged:
            assert previous is not None
            applied.at = previous.at
        state.applied = applied
        state.machine_error = None
        state.failed_target = None
        state.starting = None
        if not unchanged:
            log.info("tenant %s: running %s", state.name, applied.revision or "(no source)")
        if checkout is not None and not unchanged:
            state.record_applied(checkout.commit, applied.at)
            self.sources.switch_current(state.name, checkout.commit)
            self.sources.prune(state)

    def _rollback(self, state: TenantState) -> None:
        """The new target failed to start: bring the previous applied machine back."""
        assert state.machine_error is not None
        try:
            self.start_applied(state)
        except Exception as exc:
            again = error_info(exc, self._now())
            state.machine_error.message += (
                f"; restarting the previous revision failed too: {again.message}"
            )
