"""Host layers: a HostLayersSpec in, the signed revision's trees merged on the host out.

Per profile: fetch and verify with the tenants' git source (host/paths.py gives it its own
folder), validate the revision's trees against the host's os-release as systemd would, then
merge through host/merge.py. A revision that is refused (unsigned, bad layout, a tree systemd
would not merge) leaves the merged one as it is; a merge that fails is undone. The applied and
the previous revision trees stay on disk: a revert in git merges the old tree again, and the
boot-time merge needs nothing but local disk.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from bitbuilder.hostshim import safepath
from bitbuilder.hostshim.api import (
    ErrorInfo,
    ExtensionType,
    HostLayersPhase,
    HostLayersSpec,
    HostLayersStatus,
    MachineSpec,
)
from bitbuilder.hostshim.config import ShimConfig
from bitbuilder.hostshim.errors import LayoutError, NotFound, ShimError, SourceError
from bitbuilder.hostshim.host.merge import Merger, Trees
from bitbuilder.hostshim.host.paths import HostPaths, host_root
from bitbuilder.hostshim.host.state import HostApplied, HostState, HostStateStore
from bitbuilder.hostshim.source import extrelease
from bitbuilder.hostshim.source.git import Checkout, GitSource
from bitbuilder.hostshim.source.layout import RELEASE_DIR
from bitbuilder.hostshim.state.store import spec_hash

log = logging.getLogger(__name__)

OS_RELEASE = ("etc/os-release", "usr/lib/os-release")  # systemd's order
# The git source validates a MachineSpec; a host profile has no image (its os-release is the
# host's) and no repo settings.
_NO_IMAGE = "host"


def as_machine_spec(spec: HostLayersSpec) -> MachineSpec:
    return MachineSpec(
        name=spec.name, image=_NO_IMAGE, source=spec.source, extensions=spec.extensions
    )


def host_os_release(root: Path = Path("/")) -> dict[str, str]:
    for rel in OS_RELEASE:
        try:
            return extrelease.parse_os_release((root / rel).read_text())
        except OSError:
            continue
    raise ShimError("the host has no os-release: extension releases cannot be checked")


def check_host_trees(checkout: Checkout, os_release: extrelease.OsRelease) -> None:
    """What the tenant layout allows but a host merge does not: units, and trees without an
    extension-release (systemd merges only trees that carry one)."""
    layout = checkout.layout
    prefix = PurePosixPath(layout.root.relative_to(checkout.tree))
    if layout.units:
        raise LayoutError(f"{prefix / 'units'}: host layers carry only sysext/ and confext/")
    by_kind = {ExtensionType.sysext: layout.sysext, ExtensionType.confext: layout.confext}
    for kind, trees in by_kind.items():
        for name in trees:
            rel = PurePosixPath(
                kind.value, name, RELEASE_DIR[kind.value], f"extension-release.{name}"
            )
            try:
                safepath.lstat(layout.root, rel)
            except OSError:
                problem = extrelease.incompatibility(kind, None, os_release)
                raise LayoutError(
                    f"{prefix / rel}: missing; refused as systemd-{kind.value} would: {problem}"
                ) from None


class HostLayers:
    """Every host profile on this node. One lock: merges are host-wide."""

    def __init__(
        self, config: ShimConfig, merger: Merger | None = None, os_root: Path = Path("/")
    ) -> None:
        self.config = config
        self.store = HostStateStore(config)
        self.merger = merger or Merger(host_root(config))
        self.os_root = os_root
        self._lock = threading.Lock()

    @staticmethod
    def _now() -> datetime:
        return datetime.now(UTC)

    def _error(self, exc: ShimError, revision: str | None = None) -> ErrorInfo:
        return ErrorInfo(
            reason=exc.reason,
            message=exc.message,
            revision=exc.revision or revision,
            at=self._now(),
        )

    # --- public ---------------------------------------------------------------------------

    def apply(self, spec: HostLayersSpec) -> HostLayersStatus:
        with self._lock:
            state = self.store.load(spec.name)
            desired_hash = spec_hash(as_machine_spec(spec))
            if state is None:
                state = HostState(name=spec.name, desired=spec, desired_hash=desired_hash)
            state.desired, state.desired_hash = spec, desired_hash
            self.store.save(state)
            self._apply(state)
            self.store.save(state)
            return self._status(state)

    def get(self, name: str) -> HostLayersStatus:
        state = self.store.load(name)
        if state is None:
            raise NotFound(f"no host layers named {name!r}")
        return self._status(state)

    def list_all(self) -> list[HostLayersStatus]:
        return [self.get(name) for name in self.store.names()]

    def delete(self, name: str) -> None:
        """Unmerge the profile's trees, then remove its repository, trees and state."""
        with self._lock:
            if self.store.load(name) is None:
                raise NotFound(f"no host layers named {name!r}")
            self.merger.merge(self._wanted(exclude=name))
            paths = HostPaths(self.config, name)
            GitSource(paths, self.config).remove()
            safepath.remove_tree(paths.root)

    def restore(self) -> list[str]:
        """At boot: merge every profile's applied revision from local disk. Returns names."""
        with self._lock:
            wanted = self._wanted()
            self.merger.merge(wanted, refresh=True)
            return [n for n in self.store.names() if (s := self.store.load(n)) and s.applied]

    # --- steps ----------------------------------------------------------------------------

    def _apply(self, state: HostState) -> None:
        spec = state.desired
        paths = HostPaths(self.config, spec.name)
        source = GitSource(paths, self.config)
        os_release = host_os_release(self.os_root)
        try:
            checkout = source.sync(as_machine_spec(spec), os_release=os_release)
            state.source_revision = checkout.revision
            check_host_trees(checkout, os_release)
        except SourceError as exc:
            state.source_error = self._error(exc, state.source_revision)
            log.warning("host layers %s: %s", spec.name, exc.message)
            return
        state.source_error = None
        layout = checkout.layout
        applied = HostApplied(
            commit=checkout.commit,
            ref=checkout.ref,
            path=spec.source.path,
            sysext=sorted(layout.sysext),
            confext=sorted(layout.confext),
            at=self._now(),
        )
        wanted = self._wanted(exclude=spec.name)
        try:
            self._claim(wanted, applied.trees(paths), spec.name)
            self.merger.merge(wanted)
        except ShimError as exc:
            state.merge_error = self._error(exc, checkout.revision)
            log.warning("host layers %s: %s; merging the previous layers", spec.name, exc.message)
            try:
                self.merger.merge(self._wanted(), refresh=True)
            except ShimError as again:  # the error above is what status shows
                log.error("host layers: merging the previous layers failed: %s", again.message)
            return
        state.merge_error = None
        if state.applied is None or not state.applied.same_layers(applied):
            state.record(applied)
        keep = {s.commit for s in (state.applied, state.previous) if s is not None}
        source.prune(keep)

    def _wanted(self, exclude: str | None = None) -> dict[ExtensionType, dict[str, Path]]:
        """The trees of every applied profile (but `exclude`), by kind and name."""
        wanted: dict[ExtensionType, dict[str, Path]] = {k: {} for k in ExtensionType}
        for name in self.store.names():
            if name == exclude:
                continue
            state = self.store.load(name)
            if state is not None and state.applied is not None:
                self._claim(wanted, state.applied.trees(HostPaths(self.config, name)), name)
        return wanted

    @staticmethod
    def _claim(wanted: dict[ExtensionType, dict[str, Path]], trees: Trees, owner: str) -> None:
        for kind, named in trees.items():
            for ext, tree in named.items():
                if ext in wanted[kind]:
                    raise LayoutError(
                        f"{kind.value}/{ext}: another host profile already merges a "
                        f"{kind.value} of that name; rename it in {owner}'s repository"
                    )
                wanted[kind][ext] = tree

    def _status(self, state: HostState) -> HostLayersStatus:
        applied = state.applied
        if applied is not None:
            phase = HostLayersPhase.applied
        elif state.source_error or state.merge_error:
            phase = HostLayersPhase.failed
        else:
            phase = HostLayersPhase.pending
        return HostLayersStatus(
            name=state.name,
            phase=phase,
            spec_hash=state.desired_hash,
            source_revision=state.source_revision,
            applied_revision=applied.commit if applied else None,
            previous_revision=state.previous.commit if state.previous else None,
            history=state.history,
            sysext=applied.sysext if applied else [],
            confext=applied.confext if applied else [],
            source_error=state.source_error,
            merge_error=state.merge_error,
        )
