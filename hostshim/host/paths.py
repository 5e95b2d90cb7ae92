"""Where one host profile's repository, revision trees and state live: under <state>/host/."""

from __future__ import annotations

from pathlib import Path

from bitbuilder.hostshim.config import ShimConfig
from bitbuilder.hostshim.paths import TenantPaths


def host_root(config: ShimConfig) -> Path:
    """Every host profile's folder; a merged tree always lies below it."""
    return config.state_dir / "host"


class HostPaths(TenantPaths):
    """A host profile's paths: the tenant layout (repo.git, revisions/, credentials/,
    state.json) under host_root, so the git source serves both unchanged."""

    @property
    def root(self) -> Path:
        return host_root(self.config) / self.name
