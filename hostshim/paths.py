"""Every path the shim touches, derived from a validated tenant or image name under its roots.

Nothing here takes a caller-supplied path: names are DNS-1123 labels (checked again here, so
a bug elsewhere cannot turn a name into a traversal).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from bitbuilder.hostshim.api import DNS1123_LABEL_PATTERN
from bitbuilder.hostshim.config import ShimConfig

_LABEL = re.compile(DNS1123_LABEL_PATTERN)
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def checked_name(name: str) -> str:
    if len(name) > 63 or not _LABEL.fullmatch(name):
        raise ValueError(f"not a DNS-1123 label: {name!r}")
    return name


@dataclass(frozen=True)
class _NamedPaths:
    """Paths of one named thing; the name is checked before any path is built from it."""

    config: ShimConfig
    name: str

    def __post_init__(self) -> None:
        checked_name(self.name)


class TenantPaths(_NamedPaths):
    """One tenant's directories. State survives reboots; runtime is per boot."""

    @property
    def root(self) -> Path:
        return self.config.state_dir / "tenants" / self.name

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def repo(self) -> Path:
        """The tenant's bare git repository."""
        return self.root / "repo.git"

    @property
    def revisions(self) -> Path:
        """One checked-out tree per commit: revisions/<sha>/."""
        return self.root / "revisions"

    def revision(self, commit: str) -> Path:
        if not _COMMIT.fullmatch(commit):
            raise ValueError(f"not a commit id: {commit!r}")
        return self.revisions / commit

    @property
    def current(self) -> Path:
        """Symlink to the applied revision, switched atomically (rename over)."""
        return self.root / "current"

    @property
    def credentials(self) -> Path:
        """Mode 0700 folder for git credentials (files 0600)."""
        return self.root / "credentials"

    @property
    def data(self) -> Path:
        """The machine's own writable data (kept on suspend; on delete as the spec says)."""
        return self.root / "data"

    @property
    def data_image(self) -> Path:
        """The file system image `data` is mounted from (its size is the tenant's disk quota)."""
        return self.root / "data.img"

    @property
    def run(self) -> Path:
        """Per-boot runtime files: pid files, mounts, logs."""
        return self.config.runtime_dir / "machines" / self.name


class ImagePaths(_NamedPaths):
    """One base image: its unpacked root and its metadata."""

    @property
    def root(self) -> Path:
        return self.config.state_dir / "images" / self.name

    @property
    def rootfs(self) -> Path:
        return self.root / "rootfs"

    @property
    def raw(self) -> Path:
        """A raw disk image (GPT), for VMs: an image has either this or rootfs."""
        return self.root / "image.raw"

    @property
    def meta(self) -> Path:
        return self.root / "image.json"
