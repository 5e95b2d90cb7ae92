"""Versioned, atomic per-tenant state: what was asked for, what runs, and what is in flight.

One JSON file per tenant (TenantPaths.state_file), mode 0600 because the desired spec may carry
git credentials. Writes go to a temp file in the same directory, are fsynced, renamed over the
old file and the directory is fsynced, so a crash leaves either the old or the new state. The
`intent` field is written before the shim acts, so a restart knows what was half done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer
from pydantic.alias_generators import to_camel

from bitbuilder.hostshim.api import AppliedRevision, ErrorInfo, GitCommit, MachineSpec
from bitbuilder.hostshim.config import ShimConfig
from bitbuilder.hostshim.errors import ShimError
from bitbuilder.hostshim.paths import TenantPaths, checked_name

log = logging.getLogger(__name__)

STATE_VERSION = 1
HISTORY_LENGTH = 10
_TEMP_PREFIX = ".state."


class StateError(ShimError):
    """A state file the shim cannot use; the file is left untouched for a human to look at."""

    status = 409
    reason = "StateUnreadable"


def _secret_digest(value: str) -> str:
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()


def _canonical_hash(doc: object) -> str:
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def spec_hash(spec: MachineSpec) -> str:
    """A stable hash of the whole spec. Secrets enter only as their own digests: a credential
    change is noticed, yet the hash reveals nothing about them."""
    doc = spec.wire_secret()
    source = doc.get("source")
    credentials = source.get("credentials") if isinstance(source, dict) else None
    if isinstance(credentials, dict):
        for key in ("password", "sshPrivateKey"):
            if key in credentials:
                credentials[key] = _secret_digest(str(credentials[key]))
    return _canonical_hash(doc)


# Fields that change nothing in the running machine itself: the source decides the revision (the
# commit is compared separately), suspend/keepDataOnDelete are handled by the manager.
_NOT_MACHINE_FIELDS = {"source", "suspend", "keepDataOnDelete"}


def machine_hash(spec: MachineSpec) -> str:
    """Hash of what the running machine is built from: a change here means stop + start."""
    doc = {k: v for k, v in spec.wire().items() if k not in _NOT_MACHINE_FIELDS}
    doc["sourcePath"] = spec.source.path if spec.source is not None else None
    return _canonical_hash(doc)


class Intent(StrEnum):
    """What the shim was doing when it last wrote the state (None when at rest)."""

    apply = "apply"
    delete = "delete"


class _StateModel(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)


class AppliedState(_StateModel):
    """What was last brought up successfully (or, with running=False, stopped on purpose)."""

    spec: MachineSpec
    spec_hash: str
    machine_hash: str
    commit: GitCommit | None = None
    ref: str | None = None
    running: bool = True
    at: datetime

    @field_serializer("spec")
    def _spec_with_secrets(self, spec: MachineSpec) -> dict[str, Any]:
        return spec.wire_secret()

    @property
    def revision(self) -> str | None:
        return f"{self.ref}@sha1:{self.commit}" if self.commit else None

    @property
    def target(self) -> str:
        """What the machine was built from: the commit and the machine hash."""
        return f"{self.commit}:{self.machine_hash}"


class DriftState(_StateModel):
    count: int = 0
    last: ErrorInfo | None = None


class TenantState(_StateModel):
    version: Literal[1] = 1  # STATE_VERSION
    name: str
    desired: MachineSpec
    desired_hash: str
    intent: Intent | None = None
    keep_data: bool = False  # for a delete in flight: the caller's choice, kept across a crash
    applied: AppliedState | None = None
    source_revision: str | None = None  # the last revision fetched (good or not)
    history: list[AppliedRevision] = Field(default_factory=list)
    source_error: ErrorInfo | None = None
    machine_error: ErrorInfo | None = None
    # The target (commit, machine hash) that last failed to start: not retried on every poll
    # while the previous revision keeps running, only when the target changes.
    failed_target: str | None = None
    # The target being started right now (written before the start): a machine found running
    # it after a crash is adopted as applied instead of being restarted.
    starting: str | None = None
    drift: DriftState = Field(default_factory=DriftState)

    @field_serializer("desired")
    def _desired_with_secrets(self, spec: MachineSpec) -> dict[str, Any]:
        return spec.wire_secret()

    @classmethod
    def new(cls, spec: MachineSpec) -> TenantState:
        return cls(name=spec.name, desired=spec, desired_hash=spec_hash(spec))

    def record_applied(self, commit: str, at: datetime) -> None:
        """Put `commit` at the front of the history (newest first), at most HISTORY_LENGTH."""
        if self.history and self.history[0].revision == commit:
            return
        rest = [h for h in self.history if h.revision != commit]
        self.history = [AppliedRevision(revision=commit, applied_at=at), *rest][:HISTORY_LENGTH]


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data`: temp file in the same dir, fsync, rename, fsync the dir."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TEMP_PREFIX, suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _lost_state(paths: TenantPaths) -> bool:
    """No state file, yet the tenant's source is there: the file was lost (the state is written
    before anything else of a tenant, and a delete removes the source before it)."""
    return not paths.state_file.exists() and (paths.repo.exists() or paths.revisions.exists())


class StateStore:
    """Reads and writes tenants' state files under the configured state dir."""

    def __init__(self, config: ShimConfig) -> None:
        self.config = config

    @property
    def tenants_dir(self) -> Path:
        return self.config.state_dir / "tenants"

    def paths(self, name: str) -> TenantPaths:
        return TenantPaths(self.config, name)

    def names(self) -> list[str]:
        """Tenants with a state file, or that lost it (folders that are not valid names are
        ignored)."""
        if not self.tenants_dir.is_dir():
            return []
        names = []
        for entry in sorted(self.tenants_dir.iterdir()):
            try:
                checked_name(entry.name)
            except ValueError:
                continue
            paths = self.paths(entry.name)
            if paths.state_file.is_file() or _lost_state(paths):
                names.append(entry.name)
        return names

    def load(self, name: str) -> TenantState | None:
        """The tenant's state, None if it has none; StateError if the file cannot be used."""
        paths = self.paths(name)
        path = paths.state_file
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            if _lost_state(paths):
                raise StateError(
                    f"state file {path} is missing, yet the tenant's repository is there; its "
                    "machine and data are left as they are: DELETE the tenant (its data is "
                    "kept) and PUT its spec again",
                    reason="StateMissing",
                ) from None
            return None
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise StateError(f"state file {path} is not valid JSON: {exc}") from exc
        version = doc.get("version") if isinstance(doc, dict) else None
        if version != STATE_VERSION:
            raise StateError(
                f"state file {path} has version {version!r}; this shim reads version "
                f"{STATE_VERSION} only (the file is left as it is)",
                reason="StateVersionUnsupported",
            )
        try:
            state = TenantState.model_validate(doc)
        except ValidationError as exc:
            # The message names fields only: the inputs may hold credentials.
            fields = ", ".join(".".join(map(str, e["loc"])) for e in exc.errors()[:5])
            raise StateError(f"state file {path} is damaged (fields: {fields})") from None
        if state.name != name:
            raise StateError(f"state file {path} belongs to {state.name!r}, not {name!r}")
        return state

    def save(self, state: TenantState) -> None:
        root = self.paths(state.name).root
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stale in root.glob(_TEMP_PREFIX + "*.tmp"):
            stale.unlink(missing_ok=True)  # left by a crash between mkstemp and rename
        data = json.dumps(state.model_dump(mode="json", by_alias=True), indent=1).encode()
        write_atomic(self.paths(state.name).state_file, data + b"\n")

    def remove(self, name: str) -> None:
        path = self.paths(name).state_file
        path.unlink(missing_ok=True)
