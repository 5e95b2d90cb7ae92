"""Fixtures: a real shim server (in a thread, on a unix socket under tmp_path) over fakes."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import pytest

from bitbuilder.hostshim.api import ImageSpec, MachineStatus
from bitbuilder.hostshim.config import ShimConfig
from bitbuilder.hostshim.machine.manager import MachineManager
from bitbuilder.hostshim.main import build_manager
from bitbuilder.hostshim.paths import TenantPaths
from tests.shim.fakes import (
    FakeImages,
    FakeRemote,
    FakeRunner,
    FakeSource,
    fake_layout,
    fake_tree_check,
)
from tests.shim.harness import ServerThread, ShimClient, wait_resumed

REPO_URL = "https://git.example.com/tenants/web.git"


def shim_config(root: Path, **overrides: Any) -> ShimConfig:
    defaults: dict[str, Any] = {
        "state_dir": root / "state",
        "runtime_dir": root / "run",
        "socket_path": root / "run" / "hostshim.sock",
    }
    return ShimConfig(**{**defaults, **overrides})


def machine_spec(name: str = "web", **overrides: Any) -> dict[str, Any]:
    """A MachineSpec body (wire form) following REPO_URL's main branch."""
    spec: dict[str, Any] = {
        "name": name,
        "image": "base",
        "source": {"url": REPO_URL, "ref": {"branch": "main"}},
    }
    spec.update(overrides)
    return spec


def status(body: object) -> MachineStatus:
    """A reply body as the MachineStatus it must be."""
    return MachineStatus.model_validate(body)


class ServedShim:
    """A shim server in a thread over this config; subclasses say what the manager drives."""

    def __init__(self, config: ShimConfig, drift_interval: float | None = None) -> None:
        self.config = config
        self.drift_interval = drift_interval  # None: tests call check_drift() themselves
        self.client = ShimClient(str(config.socket_path))
        self.server: ServerThread | None = None

    def new_manager(self) -> MachineManager:
        raise NotImplementedError

    def start(self) -> Self:
        self.manager = self.new_manager()
        self.manager.startup()
        self.server = ServerThread(self.manager, self.config, self.drift_interval).start()
        wait_resumed(self.client)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def restart(self) -> None:
        self.stop()
        self.start()


class FakeShim(ServedShim):
    """Over fakes; restart() replaces the manager and server, keeps the fakes (and machines)."""

    def __init__(self, config: ShimConfig, drift_interval: float | None = None) -> None:
        super().__init__(config, drift_interval)
        self.remote = FakeRemote()
        self.runner = FakeRunner()
        self.images = FakeImages()

    def new_manager(self) -> MachineManager:
        def source_for(paths: TenantPaths) -> FakeSource:
            return FakeSource(paths, self.remote)

        return MachineManager(
            self.config,
            self.runner,
            self.images,
            source_for,
            fake_layout,
            tree_check=fake_tree_check,
        )


@contextmanager
def serving_fake_shim(root: Path, drift_interval: float | None = None) -> Iterator[FakeShim]:
    """A FakeShim serving, with REPO_URL's main at c1 and the image `base`; stopped after."""
    shim = FakeShim(shim_config(root), drift_interval)
    shim.remote.push(REPO_URL, "main", "c1")
    shim.images.put("base", ImageSpec(path="/srv/images/base"))
    shim.start()
    try:
        yield shim
    finally:
        shim.stop()


@pytest.fixture
def fake_shim(tmp_path: Path) -> Iterator[FakeShim]:
    with serving_fake_shim(tmp_path) as shim:
        yield shim


class RealShim(ServedShim):
    """Over the real git source, image store and runner (direct executor)."""

    def new_manager(self) -> MachineManager:
        return build_manager(self.config)

    def stop_all(self) -> None:
        """Stop the shim and every machine it may have left (even half-started ones)."""
        self.stop()
        runner = build_manager(self.config).runner
        names: set[str] = set()
        for folder in (self.config.state_dir / "tenants", self.config.runtime_dir / "machines"):
            if folder.is_dir():
                names.update(p.name for p in folder.iterdir() if not p.name.startswith("."))
        for name in sorted(names):
            runner.stop(name)


def real_config(tmp_path: Path, **overrides: Any) -> ShimConfig:
    """Real components under tmp_path: file:// repos allowed under tmp_path/served, images
    from tmp_path/images."""
    for folder in ("served", "images"):
        (tmp_path / folder).mkdir(exist_ok=True)
    defaults: dict[str, Any] = {
        "file_source_roots": (tmp_path / "served",),
        "source_networks": (ipaddress.ip_network("127.0.0.0/8"),),  # the test git servers
        "trusted_image_paths": (tmp_path / "images",),
        "executor": "direct",
    }
    return shim_config(tmp_path, **{**defaults, **overrides})


@pytest.fixture
def real_shim(tmp_path: Path) -> Iterator[RealShim]:
    shim = RealShim(real_config(tmp_path)).start()
    try:
        yield shim
    finally:
        shim.stop_all()
