"""The source step: the tenant's repo at the desired ref, fetched, verified and checked out.

It alone sets what status reports as SourceReady (sourceRevision, sourceError), and it keeps
the revision trees: the `current` link, pruning, and checking out an applied revision again.
A failure here never touches the machine: the caller keeps the last good revision running.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import replace

from bitbuilder.hostshim.api import GitRef, MachineSpec
from bitbuilder.hostshim.config import ShimConfig
from bitbuilder.hostshim.errors import SourceError
from bitbuilder.hostshim.machine.parts import (
    Clock,
    LayoutLoader,
    SourceFactory,
    SourceLike,
    error_info,
)
from bitbuilder.hostshim.paths import TenantPaths
from bitbuilder.hostshim.source.git import Checkout
from bitbuilder.hostshim.state.store import TenantState

log = logging.getLogger(__name__)


def pinned(spec: MachineSpec, commit: str) -> MachineSpec:
    """The same spec with its source pinned to `commit` (to re-check out an applied revision)."""
    assert spec.source is not None
    return spec.model_copy(
        update={"source": spec.source.model_copy(update={"ref": GitRef(commit=commit)})}
    )


class SourceStep:
    def __init__(
        self, config: ShimConfig, source_for: SourceFactory, load_layout: LayoutLoader, now: Clock
    ) -> None:
        self.config = config
        self._source_for = source_for
        self._load_layout = load_layout
        self._now = now

    def paths(self, name: str) -> TenantPaths:
        return TenantPaths(self.config, name)

    def source(self, name: str) -> SourceLike:
        return self._source_for(self.paths(name))

    def sync(self, state: TenantState) -> Checkout | None:
        """The desired revision, checked out; None if the spec has no source or it failed
        (then sourceError says why)."""
        spec = state.desired
        if spec.source is None:
            return None
        try:
            checkout = self.source(spec.name).sync(spec)
        except Exception as exc:
            state.source_error = error_info(exc, self._now())
            if isinstance(exc, SourceError) and exc.revision:
                state.source_revision = exc.revision
            log.warning("tenant %s: source: %s", spec.name, state.source_error.message)
            return None
        state.source_revision = checkout.revision
        state.source_error = None
        return checkout

    def applied_checkout(self, state: TenantState) -> Checkout | None:
        """The applied revision's tree (checked out again if it is gone)."""
        applied = state.applied
        assert applied is not None
        if applied.commit is None:
            return None
        tree = self.paths(state.name).revision(applied.commit)
        if tree.is_dir():
            layout = self._load_layout(tree, applied.spec)
            return Checkout(applied.commit, applied.ref or applied.commit, tree, layout)
        # The tree is gone (pruned by hand, or moved aside as tampered): check it out again.
        checkout = self.source(state.name).sync(pinned(applied.spec, applied.commit))
        return replace(checkout, ref=applied.ref or checkout.ref)

    def switch_current(self, name: str, commit: str) -> None:
        """Point `current` at the applied revision: a new symlink renamed over the old one."""
        paths = self.paths(name)
        target = paths.revision(commit).relative_to(paths.root)
        tmp = paths.root / f".current.{uuid.uuid4().hex}"
        os.symlink(target, tmp)
        os.replace(tmp, paths.current)

    def prune(self, state: TenantState) -> None:
        try:
            self.source(state.name).prune([h.revision for h in state.history])
        except Exception:
            log.exception("tenant %s: pruning old revisions failed", state.name)
