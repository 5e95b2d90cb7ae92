"""The kopf operator against an emulated Kubernetes API (tests/helpers/kube_emulator.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bitbuilder.operator.crd import HOST_PROFILE, resource_crd, tenant_crd
from tests.helpers.kube_emulator import Emulator, EmulatorThread
from tests.helpers.kube_http import Kube
from tests.kopf.support import FakeShimServer

# The real host (shim process, nspawn, git daemon) is standalone mode's test host.
from tests.standalone.conftest import host  # noqa: F401


@pytest.fixture
def api() -> Iterator[EmulatorThread]:
    """A fresh emulated API server serving the Tenant and HostProfile CRDs, on 127.0.0.1."""
    with EmulatorThread(Emulator([tenant_crd(), resource_crd(HOST_PROFILE)])) as server:
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
