"""The tenant repository's layout: what a revision's tree may hold, validated before use."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class RepoSettings:
    """Settings from the repo's machine.yaml, already limited to what the spec allows."""

    hostname: str | None = None
    environment: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Layout:
    root: Path  # the revision tree joined with spec.source.path
    sysext: dict[str, Path]  # name -> tree dir (contains usr/)
    confext: dict[str, Path]  # name -> tree dir (contains etc/)
    units: dict[str, Path]  # unit file name -> file
    settings: RepoSettings
