"""Fixtures for the machine runner: a runner under a temp root with the busybox image imported.

Container tests need root, systemd-nspawn and nft; without them they are skipped. Every
machine a test starts is stopped by the fixture, and the fixture checks that stop left no
process, mount, cgroup, link or filter table behind.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bitbuilder.hostshim.api import ImageSpec, MachineSpec
from bitbuilder.hostshim.config import ShimConfig
from bitbuilder.hostshim.images.store import ImageStore
from bitbuilder.hostshim.machine.cgroups import MachineCgroups
from bitbuilder.hostshim.machine.executor import DirectExecutor, in_cgroups, shim_scope
from bitbuilder.hostshim.machine.network import filter_entries, link_name
from bitbuilder.hostshim.machine.runner import Runner, RunningMachine
from bitbuilder.hostshim.source.git import Checkout
from tests.helpers.needs import needs_root_and
from tests.helpers.wait import wait_for

needs_nspawn = needs_root_and("systemd-nspawn", "nft")


def unique_name(prefix: str = "cr") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def trusted(tmp_path: Path) -> Path:
    """A folder the shim's config trusts for image paths (runner_config)."""
    path = tmp_path / "trusted"
    path.mkdir()
    return path


def runner_config(root: Path, trusted: Path, **overrides: Any) -> ShimConfig:
    return ShimConfig(
        state_dir=root / "state",
        runtime_dir=root / "run",
        trusted_image_paths=(trusted,),
        **overrides,
    )


@dataclass
class Leftovers:
    """What one machine's run created on the host, to check that stop removed it."""

    pids: set[int]
    cgroups: MachineCgroups
    root_mount: Path
    ifname: str


@dataclass
class Shim:
    config: ShimConfig
    images: ImageStore
    executor: DirectExecutor
    runner: Runner
    started: list[str] = field(default_factory=list)

    def start(
        self, name: str | None = None, checkout: Checkout | None = None, **spec: Any
    ) -> RunningMachine:
        body = {"name": name or unique_name(), "image": "busybox", **spec}
        machine_spec = MachineSpec.model_validate(body)
        self.started.append(machine_spec.name)
        return self.runner.start(machine_spec, checkout)

    def run_in(
        self, machine: RunningMachine, *argv: str, in_cgroup: bool = False, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside the machine's namespaces (and, if asked, inside its cgroups)."""
        command = ["nsenter", "-t", str(machine.leader_pid), "-a", *argv]
        if in_cgroup:
            cgroups = self.executor.cgroups(machine.name)
            assert cgroups is not None
            command = in_cgroups(cgroups.procs_files(), command)
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)

    def leftovers(self, name: str) -> Leftovers:
        cgroups = self.executor.cgroups(name)
        assert cgroups is not None
        return Leftovers(
            pids=cgroups.pids(),
            cgroups=cgroups,
            root_mount=self.config.runtime_dir / "machines" / name / "root",
            ifname=link_name(shim_scope(self.config), name),
        )


def assert_gone(left: Leftovers) -> None:
    """Nothing of a stopped machine's run is left on the host (processes: once reaped)."""
    wait_for(lambda: not [p for p in left.pids if Path(f"/proc/{p}").exists()], 10, what="exit")
    assert not [d for d in left.cgroups.dirs if d.exists()], "cgroups survive stop"
    assert not os.path.ismount(left.root_mount), "root overlay still mounted"
    assert not Path(f"/sys/class/net/{left.ifname}").exists(), "host link survives stop"
    assert not filter_entries(left.ifname), "link filter elements survive stop"


def make_shim(root: Path, rootfs: Path, **config_overrides: Any) -> Shim:
    config = runner_config(root, rootfs.parent, **config_overrides)
    images = ImageStore(config)
    images.put("busybox", ImageSpec(path=str(rootfs)))
    executor = DirectExecutor(config)
    return Shim(config, images, executor, Runner(config, images, executor))


@pytest.fixture
def shim(tmp_path: Path, busybox_rootfs: Path) -> Iterator[Shim]:
    made = make_shim(tmp_path, busybox_rootfs)
    try:
        yield made
    finally:
        stop_all(made)


def stop_all(made: Shim) -> None:
    """Stop every machine the test started (in parallel: busybox init takes ~2 s to power
    off) and check each left nothing behind."""
    running = [n for n in made.started if made.executor.pid(n) is not None]
    left = [made.leftovers(n) for n in running]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(made.runner.stop, made.started))
    for each in left:
        assert_gone(each)


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
