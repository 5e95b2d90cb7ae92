"""A host profile's persisted state: what was asked for, what is merged, what was before.

One JSON file per profile (HostPaths.state_file), mode 0600 (the desired spec may carry git
credentials), written atomically like the tenants' state (state/store.py). The boot-time merge
reads only this and the revision trees on disk.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer
from pydantic.alias_generators import to_camel

from bitbuilder.hostshim.api import (
    AppliedRevision,
    ErrorInfo,
    ExtensionType,
    GitCommit,
    HostLayersSpec,
    RepoPath,
)
from bitbuilder.hostshim.config import ShimConfig
from bitbuilder.hostshim.host.paths import HostPaths, host_root
from bitbuilder.hostshim.paths import checked_name
from bitbuilder.hostshim.state.store import HISTORY_LENGTH, StateError, write_atomic


class _StateModel(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)


class HostApplied(_StateModel):
    """One merged revision: its trees are <revision>/<path>/<kind>/<name>."""

    commit: GitCommit
    ref: str
    path: RepoPath = ""
    sysext: list[str] = Field(default_factory=list)
    confext: list[str] = Field(default_factory=list)
    at: datetime

    @property
    def revision(self) -> str:
        return f"{self.ref}@sha1:{self.commit}"

    def trees(self, paths: HostPaths) -> dict[ExtensionType, dict[str, Path]]:
        base = paths.revision(self.commit) / self.path
        return {
            ExtensionType.sysext: {n: base / "sysext" / n for n in self.sysext},
            ExtensionType.confext: {n: base / "confext" / n for n in self.confext},
        }

    def same_layers(self, other: HostApplied) -> bool:
        return (self.commit, self.path, self.sysext, self.confext) == (
            other.commit, other.path, other.sysext, other.confext,
        )  # fmt: skip


class HostState(_StateModel):
    version: Literal[1] = 1
    name: str
    desired: HostLayersSpec
    desired_hash: str
    applied: HostApplied | None = None
    previous: HostApplied | None = None  # kept on disk: a revert merges it without a checkout
    source_revision: str | None = None
    history: list[AppliedRevision] = Field(default_factory=list)
    source_error: ErrorInfo | None = None
    merge_error: ErrorInfo | None = None

    @field_serializer("desired")
    def _desired_with_secrets(self, spec: HostLayersSpec) -> dict[str, Any]:
        return spec.wire_secret()

    def record(self, applied: HostApplied) -> None:
        """Make `applied` the merged revision; the one before becomes `previous`."""
        if self.applied is not None and self.applied.commit != applied.commit:
            self.previous = self.applied
        self.applied = applied
        rest = [h for h in self.history if h.revision != applied.commit]
        entry = AppliedRevision(revision=applied.commit, applied_at=applied.at)
        self.history = [entry, *rest][:HISTORY_LENGTH]


class HostStateStore:
    def __init__(self, config: ShimConfig) -> None:
        self.config = config

    def paths(self, name: str) -> HostPaths:
        return HostPaths(self.config, name)

    def names(self) -> list[str]:
        root = host_root(self.config)
        if not root.is_dir():
            return []
        found = []
        for entry in sorted(root.iterdir()):
            try:
                checked_name(entry.name)
            except ValueError:
                continue
            if self.paths(entry.name).state_file.is_file():
                found.append(entry.name)
        return found

    def load(self, name: str) -> HostState | None:
        path = self.paths(name).state_file
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            state = HostState.model_validate(json.loads(raw))
        except (ValueError, RecursionError) as exc:
            fields = ""
            if isinstance(exc, ValidationError):  # names fields only: inputs may be secrets
                fields = " (fields: " + ", ".join(
                    ".".join(map(str, e["loc"])) for e in exc.errors()[:5]
                ) + ")"  # fmt: skip
            raise StateError(f"host state file {path} is damaged{fields}") from None
        if state.name != name:
            raise StateError(f"host state file {path} belongs to {state.name!r}, not {name!r}")
        return state

    def save(self, state: HostState) -> None:
        paths = self.paths(state.name)
        paths.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = json.dumps(state.model_dump(mode="json", by_alias=True), indent=1).encode()
        write_atomic(paths.state_file, data + b"\n")
