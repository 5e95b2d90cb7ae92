"""What the manager and its steps need of the runner, the git source and the image store
(protocols: tests pass fakes), and how a failure becomes the error that status shows."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from datetime import datetime
from pathlib import Path
from typing import Protocol

from bitbuilder.hostshim.api import ErrorInfo, ImageSpec, ImageStatus, MachineSpec
from bitbuilder.hostshim.errors import ShimError, host_error_from
from bitbuilder.hostshim.paths import TenantPaths
from bitbuilder.hostshim.source.git import Checkout
from bitbuilder.hostshim.source.layout import Layout

log = logging.getLogger(__name__)


class MachineInfo(Protocol):
    @property
    def leader_pid(self) -> int: ...
    @property
    def revision(self) -> str | None: ...
    @property
    def started_at(self) -> datetime: ...
    @property
    def address(self) -> str | None: ...
    @property
    def acceleration(self) -> str | None: ...


class RunnerLike(Protocol):
    def start(self, spec: MachineSpec, checkout: Checkout | None) -> MachineInfo: ...
    def stop(self, name: str) -> None: ...
    def inspect(self, name: str) -> MachineInfo | None: ...
    def adopt(self) -> Mapping[str, MachineInfo]: ...
    def remove_data(self, name: str) -> None: ...


class SourceLike(Protocol):
    def sync(self, spec: MachineSpec) -> Checkout: ...
    def prune(self, keep: Collection[str]) -> None: ...
    def remove(self) -> None: ...


class ImagesLike(Protocol):
    def put(self, name: str, spec: ImageSpec) -> ImageStatus: ...
    def get(self, name: str) -> ImageStatus: ...
    def list(self) -> list[ImageStatus]: ...
    def delete(self, name: str) -> None: ...


SourceFactory = Callable[[TenantPaths], SourceLike]
LayoutLoader = Callable[[Path, MachineSpec], Layout]
TreeCheck = Callable[[Path, str, Path], list[str]]  # (bare repo, commit, tree) -> differences
Clock = Callable[[], datetime]


def error_info(exc: BaseException, at: datetime, revision: str | None = None) -> ErrorInfo:
    """A failure as status shows it; anything but a ShimError is a bug, logged in full."""
    # A full or read-only disk is the host's condition: say what to change.
    exc = host_error_from(exc, "the shim could not write its files") or exc
    if isinstance(exc, ShimError):
        return ErrorInfo(
            reason=exc.reason, message=exc.message, revision=exc.revision or revision, at=at
        )
    log.error("unexpected error", exc_info=exc)
    return ErrorInfo(reason="InternalError", message=f"{type(exc).__name__}: {exc}", at=at)
