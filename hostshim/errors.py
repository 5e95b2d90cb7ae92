"""Errors the shim reports: each carries a CamelCase reason and the HTTP status it maps to."""

from __future__ import annotations


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
