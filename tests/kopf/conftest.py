"""The kopf operator against an emulated Kubernetes API (tests/helpers/kube_emulator.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import kopf
import pytest
from kubernetes import client as k8s

from bitbuilder.operator.crd import tenant_crd
from bitbuilder.operator.handlers import (
    Driver,
    KubeSecrets,
    StatusWriter,
    build_registry,
    run_operator,
)
from bitbuilder.operator.reconcile import Node
from bitbuilder.operator.shimclient import ShimClient
from tests.helpers.fakeshim import FakeShim, running_fake_shim
from tests.helpers.kube_emulator import Emulator, EmulatorThread
from tests.helpers.kube_http import Kube
from tests.helpers.loop_thread import LoopThread

NODE = "node1"


@pytest.fixture
def api() -> Iterator[EmulatorThread]:
    """A fresh emulated API server serving the Tenant CRD, on 127.0.0.1."""
    with EmulatorThread(Emulator([tenant_crd()])) as server:
        yield server


@pytest.fixture
def kube(api: EmulatorThread) -> Kube:
    return Kube(api.url)


@pytest.fixture
def fake_shim(tmp_path: Path) -> Iterator[FakeShim]:
    """The in-memory shim (tests/helpers/fakeshim.py) on a unix socket, in its own thread."""
    loop = LoopThread("fake-shim")
    loop.start()
    context = running_fake_shim(tmp_path / "shim.sock")
    fake = loop.call(context.__aenter__())
    try:
        yield fake
    finally:
        loop.call(context.__aexit__(None, None, None))
        loop.stop()


@contextmanager
def operator_thread(url: str, socket: Path) -> Iterator[Driver]:
    """The real handlers in kopf, in a thread: kopf.run(standalone, clusterwide) with a login
    handler for the emulator; stopped through its stop flag."""
    api = k8s.ApiClient(k8s.Configuration(host=url))
    driver = Driver(ShimClient(socket, timeout=5), KubeSecrets(api), StatusWriter(api), Node(NODE))

    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=url, insecure=True)

    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(
        target=run_operator,
        args=(build_registry(driver, login=login),),
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
