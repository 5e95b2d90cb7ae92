"""The tenant's config repo through pygit2: fetch, verify, check out one tree per commit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bitbuilder.hostshim.layout import Layout


@dataclass(frozen=True)
class Checkout:
    commit: str  # 40 hex
    ref: str  # "main", "v1.0" or the commit itself
    tree: Path  # TenantPaths.revision(commit): complete and immutable once returned
    layout: Layout

    @property
    def revision(self) -> str:
        return f"{self.ref}@sha1:{self.commit}"
