"""The kopf operator against an emulated Kubernetes API (tests/helpers/kube_emulator.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from aiohttp import web
from kubernetes import client as k8s

from bitbuilder.operator.crd import tenant_crd
from bitbuilder.operator.handlers import Driver, build_registry, run_operator
from bitbuilder.operator.kubeapi import KubeSecrets, StatusWriter, client_login
from bitbuilder.operator.reconcile import Node
from bitbuilder.operator.shimclient import ShimClient
from tests.helpers.fakeshim import FakeShim
from tests.helpers.fakeshim import _app as fake_shim_app
from tests.helpers.kube_emulator import Emulator, EmulatorThread
from tests.helpers.kube_http import Kube
from tests.helpers.loop_thread import LoopThread

# The real host (shim process, nspawn, git daemon) is standalone mode's test host.
from tests.standalone.conftest import busybox_rootfs, host  # noqa: F401

NODE = "node1"


@pytest.fixture
def api() -> Iterator[EmulatorThread]:
    """A fresh emulated API server serving the Tenant CRD, on 127.0.0.1."""
    with EmulatorThread(Emulator([tenant_crd()])) as server:
        yield server


@pytest.fixture
def kube(api: EmulatorThread) -> Kube:
    return Kube(api.url)


Kubectl = Callable[..., str]
KUBECTL = shutil.which(
    "kubectl", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
)


@pytest.fixture
def kubectl(api: EmulatorThread, tmp_path: Path) -> Kubectl:
    """kubectl against the emulator: its stdout; with ok=False, its stderr, and it must fail."""
    if KUBECTL is None:
        pytest.skip("kubectl is not installed")
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "HOME": str(tmp_path)}

    def run(*args: str, ok: bool = True) -> str:
        assert KUBECTL is not None
        done = subprocess.run([KUBECTL, *args], env=env, capture_output=True, text=True, timeout=60)
        assert (done.returncode == 0) == ok, done.stderr or done.stdout
        return done.stdout if ok else done.stderr

    return run


class FakeShimServer:
    """The in-memory shim (tests/helpers/fakeshim.py) on a unix socket, in its own thread;
    down() and up() stop and restart its server (its state stays)."""

    def __init__(self, socket: Path) -> None:
        self.fake = FakeShim(socket)
        self.thread = LoopThread("fake-shim")
        self.runner: web.AppRunner | None = None

    def up(self) -> None:
        self.thread.call(self._up())

    def down(self) -> None:
        if self.runner is not None:
            self.thread.call(self.runner.cleanup())
            self.runner = None

    async def _up(self) -> None:
        self.runner = web.AppRunner(fake_shim_app(self.fake))
        await self.runner.setup()
        await web.UnixSite(self.runner, str(self.fake.socket)).start()


@pytest.fixture
def shim(tmp_path: Path) -> Iterator[FakeShimServer]:
    server = FakeShimServer(tmp_path / "shim.sock")
    server.thread.start()
    server.up()
    try:
        yield server
    finally:
        server.down()
        server.thread.stop()


@contextmanager
def operator_thread(url: str, socket: Path) -> Iterator[Driver]:
    """The real handlers in kopf, in a thread: kopf.run(standalone, clusterwide) with a login
    handler for the emulator; stopped through its stop flag."""
    api = k8s.ApiClient(k8s.Configuration(host=url))
    driver = Driver(ShimClient(socket, timeout=5), KubeSecrets(api), StatusWriter(api), Node(NODE))

    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(
        target=run_operator,
        args=(build_registry(driver, client_login(api)),),
        kwargs={"stop_flag": stop, "ready_flag": ready},
        daemon=True,
        name="kopf",
    )
    thread.start()
    try:
        assert ready.wait(30), "kopf did not start"
        yield driver
    finally:
        stop.set()
        thread.join(30)
        api.close()  # type: ignore[no-untyped-call]
