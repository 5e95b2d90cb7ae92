"""In-memory stand-ins for the git source, the runner and the image store (fast API tests).

They satisfy the manager's protocols (SourceLike, RunnerLike, ImagesLike in hostshim/machine/parts.py)
and record calls so tests can assert what the manager did — and did not — do.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bitbuilder.hostshim.api import ImageSpec, ImageStatus, MachineSpec
from bitbuilder.hostshim.errors import ImageError, LayoutError, MachineError, SourceError
from bitbuilder.hostshim.paths import TenantPaths
from bitbuilder.hostshim.source.git import Checkout
from bitbuilder.hostshim.source.layout import Layout, RepoSettings
from tests.helpers.fakeshim import image_status


def commit_id(label: str) -> str:
    return hashlib.sha1(label.encode()).hexdigest()


@dataclass
class FakeRemote:
    """All tenants' remotes: url -> {ref: commit}; commits listed in `bad` fail validation."""

    heads: dict[str, dict[str, str]] = field(default_factory=dict)
    bad: set[str] = field(default_factory=set)
    unreachable: set[str] = field(default_factory=set)
    syncs: list[tuple[str, str]] = field(default_factory=list)  # (tenant, commit) per sync

    def push(self, url: str, ref: str, label: str) -> str:
        commit = commit_id(label)
        self.heads.setdefault(url, {})[ref] = commit
        return commit


def fake_layout(tree: Path, spec: MachineSpec) -> Layout:
    return Layout(root=tree, sysext={}, confext={}, units={}, settings=RepoSettings())


class FakeSource:
    def __init__(self, paths: TenantPaths, remote: FakeRemote) -> None:
        self.paths = paths
        self.remote = remote

    def sync(self, spec: MachineSpec) -> Checkout:
        assert spec.source is not None
        url, ref = spec.source.url, spec.source.ref
        if url in self.remote.unreachable:
            raise SourceError(f"cannot reach {url}", reason="SourceUnreachable")
        commit = ref.commit or self.remote.heads.get(url, {}).get(ref.value)
        if commit is None:
            raise SourceError(f"ref {ref.value!r} not found", reason="RefNotFound")
        revision = f"{ref.describe()}@sha1:{commit}"
        self.remote.syncs.append((self.paths.name, commit))
        if commit in self.remote.bad:
            raise LayoutError("units/x.service: not a unit", revision=revision)
        tree = self.paths.revision(commit)
        if not tree.is_dir():
            tree.mkdir(parents=True)
            (tree / "README").write_text(commit)
        return Checkout(commit, ref.describe(), tree, fake_layout(tree, spec))

    def prune(self, keep: Collection[str]) -> None:
        if self.paths.revisions.is_dir():
            for tree in self.paths.revisions.iterdir():
                if tree.name not in keep and not tree.name.startswith("."):
                    (tree / "README").unlink(missing_ok=True)
                    tree.rmdir()

    def remove(self) -> None:
        self.prune(())


def fake_tree_check(repo: Path, commit: str, tree: Path) -> list[str]:
    """A tree is intact while its README still holds its commit (what FakeSource wrote)."""
    readme = tree / "README"
    return [] if readme.is_file() and readme.read_text() == commit else ["README"]


@dataclass(frozen=True)
class FakeMachine:
    name: str
    leader_pid: int
    started_at: datetime
    address: str | None
    revision: str | None
    spec: MachineSpec
    acceleration: str | None = None


class FakeRunner:
    _pids = itertools.count(10_000)

    def __init__(self) -> None:
        self.machines: dict[str, FakeMachine] = {}
        self.data: set[str] = set()
        self.starts: list[str] = []
        self.stops: list[str] = []
        self.fail_images: set[str] = set()  # specs with this image fail to start
        self.fail_stop: set[str] = set()  # machines that cannot be stopped
        self.lock = threading.Lock()

    def start(self, spec: MachineSpec, checkout: Checkout | None) -> FakeMachine:
        with self.lock:
            if spec.image in self.fail_images:
                raise MachineError(f"machine {spec.name} exited at once", reason="MachineFailed")
            assert spec.name not in self.machines, "start while running"
            machine = FakeMachine(
                spec.name,
                next(self._pids),
                datetime.now(UTC),
                "10.0.0.2",
                checkout.revision if checkout is not None else None,
                spec,
            )
            self.machines[spec.name] = machine
            self.data.add(spec.name)
            self.starts.append(spec.name)
            return machine

    def stop(self, name: str) -> None:
        if name in self.fail_stop:
            raise MachineError(f"machine {name} does not stop", reason="StopFailed")
        with self.lock:
            if self.machines.pop(name, None) is not None:
                self.stops.append(name)

    def inspect(self, name: str) -> FakeMachine | None:
        return self.machines.get(name)

    def adopt(self) -> dict[str, FakeMachine]:
        return dict(self.machines)

    def remove_data(self, name: str) -> None:
        self.data.discard(name)

    def kill(self, name: str) -> None:
        """The machine dies behind the shim's back."""
        del self.machines[name]


class FakeImages:
    def __init__(self) -> None:
        self.images: dict[str, ImageStatus] = {}

    def put(self, name: str, spec: ImageSpec) -> ImageStatus:
        status = image_status(name, spec)
        self.images[name] = status
        return status

    def get(self, name: str) -> ImageStatus:
        if name not in self.images:
            raise ImageError(f"image {name!r} not found", reason="ImageNotFound")
        return self.images[name]

    def list(self) -> list[ImageStatus]:
        return list(self.images.values())

    def delete(self, name: str) -> None:
        self.get(name)
        del self.images[name]
