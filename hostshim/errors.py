"""Errors the shim reports: each carries a CamelCase reason and the HTTP status it maps to."""

from __future__ import annotations

import errno


class ShimError(Exception):
    """Base: `reason` is what status and API errors show; `status` the HTTP code."""

    status = 500
    reason = "InternalError"

    def __init__(self, message: str, *, reason: str | None = None, revision: str | None = None):
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.revision = revision


class NotFound(ShimError):
    status = 404
    reason = "NotFound"


class Conflict(ShimError):
    status = 409
    reason = "Conflict"


class SourceError(ShimError):
    """The tenant repo could not be fetched or its revision is not acceptable.

    Reasons: SourceUnreachable, AuthenticationFailed, RefNotFound, UnverifiedCommit,
    CorruptRepository, SourceNotAllowed.
    """

    status = 422
    reason = "SourceUnreachable"


class LayoutError(SourceError):
    """A revision's tree breaks the tenant-repo layout rules: never applied."""

    reason = "InvalidRevision"


class ImageError(ShimError):
    """Reasons: ImageNotFound, ImageDigestMismatch, ImageSourceNotAllowed, ImageInvalid."""

    status = 422
    reason = "ImageInvalid"


class MachineError(ShimError):
    """The machine could not be started, stopped or inspected."""

    reason = "MachineFailed"


class HostError(MachineError):
    """The host is not set up for what the shim needs (a read-only or missing cgroup file
    system, no nftables, no user namespaces, a full disk): the message names the host setting
    and what to change. Not the tenant's fault, and not a bug of the shim.

    Reasons: CgroupsReadOnly, CgroupsMissing, SysctlDenied, NftablesMissing,
    UserNamespacesDisabled, HostDiskFull, HostReadOnly.
    """

    status = 503
    reason = "HostNotReady"


def host_error_from(exc: BaseException, what: str) -> HostError | None:
    """An OSError that only the host's set-up explains (full or read-only disk), classified;
    None for anything else. `what` says what the shim was doing."""
    if not isinstance(exc, OSError):
        return None
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return HostError(
            f"{what}: no space left on the host's disk{where}: free space on that file system "
            "or move the shim's --state-dir / --runtime-dir to a larger one",
            reason="HostDiskFull",
        )
    if exc.errno == errno.EROFS:
        return HostError(
            f"{what}: the host's file system is read-only{where}: remount it read-write or "
            "move the shim's --state-dir / --runtime-dir to a writable one",
            reason="HostReadOnly",
        )
    return None
