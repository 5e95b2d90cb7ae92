"""What the kopf tests share: Tenant manifests and status probes, the in-memory shim in a thread,
and the operator in a thread or as a process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aiohttp import web
from kubernetes import client as k8s

from bitbuilder.operator.api import OPERATOR_NAMESPACE, RECONCILE_REQUESTED_ANNOTATION
from bitbuilder.operator.crd import HOST_PROFILE, resource_crd, tenant_crd
from bitbuilder.operator.demohost import free_port, stop_process
from bitbuilder.operator.handlers import Driver, build_registry, run_operator
from bitbuilder.operator.kubeapi import KubePods, KubeSecrets, StatusWriter, client_login
from bitbuilder.operator.placement import TENANT_LABEL, live_pod
from bitbuilder.operator.reconcile import Node
from bitbuilder.operator.shimclient import ShimClient
from tests.helpers.fakeshim import FakeShim
from tests.helpers.fakeshim import _app as fake_shim_app
from tests.helpers.kube_emulator import Emulator, EmulatorThread
from tests.helpers.kube_http import TENANTS, Kube
from tests.helpers.loop_thread import LoopThread
from tests.helpers.standin_scheduler import StandInScheduler
from tests.helpers.wait import wait_for

NODE = "node1"
SHA_A, SHA_B = "a" * 40, "b" * 40
ROOT = Path(__file__).resolve().parents[2]
PODS = f"/api/v1/namespaces/{OPERATOR_NAMESPACE}/pods"


def tenant(name: str = "web", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "bitbuilder.io/v1alpha1",
        "kind": "Tenant",
        "metadata": {"name": name},
        "spec": {
            "image": {"name": "base"},
            "source": {"url": "https://git.example/web.git", "ref": {"branch": "main"}},
            **spec,
        },
    }


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    for cond in ((obj or {}).get("status") or {}).get("conditions", []):
        if cond["type"] == kind:
            return dict(cond)
    return {}


def status_where(kube: Kube, name: str, **wanted: Any) -> dict[str, Any] | None:
    obj = kube.get(f"{TENANTS}/{name}")
    status = (obj or {}).get("status") or {}
    return obj if all(status.get(k) == v for k, v in wanted.items()) else None


def stalled_tenant(kube: Kube, name: str) -> dict[str, Any] | None:
    """The Tenant while its Stalled condition is True."""
    obj = kube.get(f"{TENANTS}/{name}")
    return obj if condition(obj, "Stalled").get("status") == "True" else None


def event_reasons(kube: Kube, name: str) -> set[str]:
    events = kube.ok("GET", "/api/v1/namespaces/default/events")["items"]
    return {e["reason"] for e in events if e["involvedObject"]["name"] == name}


def request_sync(kube: Kube, name: str, token: str) -> None:
    kube.merge(
        f"{TENANTS}/{name}", {"metadata": {"annotations": {RECONCILE_REQUESTED_ANNOTATION: token}}}
    )


def phases_since(kube: Kube, name: str, resource_version: str) -> list[str]:
    """Every phase the Tenant's status went through after `resource_version` (watch replay)."""
    events = kube.watch(TENANTS, resourceVersion=resource_version, timeoutSeconds="1")
    phases: list[str] = []
    for event in events:
        obj: dict[str, Any] = event["object"]
        phase = (obj.get("status") or {}).get("phase")
        if obj["metadata"]["name"] == name and phase and (not phases or phases[-1] != phase):
            phases.append(phase)
    return phases


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


def add_node(kube: Kube, name: str, **labels: str) -> None:
    """A Ready Node, as a kubelet would register it."""
    ready = {"type": "Ready", "status": "True", "reason": "KubeletReady"}
    node = {"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **labels}},
            "status": {"conditions": [ready], "allocatable": {"cpu": "4", "memory": "8Gi"}}}  # fmt: skip
    kube.ok("POST", "/api/v1/nodes", node)


@contextmanager
def emulated_cluster() -> Iterator[EmulatorThread]:
    """A fresh emulated API server serving the Tenant and HostProfile CRDs, on 127.0.0.1, with
    one Ready node (NODE), the operator's namespace and the stand-in scheduler binding
    reservation pods."""
    with EmulatorThread(Emulator([tenant_crd(), resource_crd(HOST_PROFILE)])) as server:
        kube = Kube(server.url)
        kube.ok("POST", "/api/v1/namespaces", {"metadata": {"name": OPERATOR_NAMESPACE}})
        add_node(kube, NODE)
        scheduler = StandInScheduler(server.url, OPERATOR_NAMESPACE).start()
        try:
            yield server
        finally:
            scheduler.stop()


def set_ready(kube: Kube, node: str, ready: bool) -> None:
    """What the node lifecycle controller writes when a kubelet stops (or resumes) reporting."""
    status = "True" if ready else "Unknown"
    condition = {"type": "Ready", "status": status, "reason": "KubeletReady"}
    kube.merge(f"/api/v1/nodes/{node}", {"status": {"conditions": [condition]}})


def pod_of(kube: Kube, name: str) -> dict[str, Any] | None:
    """The Tenant's reservation pod that is not being deleted."""
    return live_pod(kube.ok("GET", f"{PODS}?labelSelector={TENANT_LABEL}={name}")["items"])


@contextmanager
def operator_thread(url: str, socket: Path, node: str = NODE) -> Iterator[Driver]:
    """The real handlers in kopf, in a thread: kopf.run(standalone) with a login handler for
    the emulator; stopped through its stop flag."""
    api = k8s.ApiClient(k8s.Configuration(host=url))
    shim = ShimClient(socket, timeout=5)
    driver = Driver(shim, KubeSecrets(api), StatusWriter(api), Node(node), KubePods(api))

    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(
        target=run_operator,
        args=(build_registry(driver, client_login(api)),),
        kwargs={"stop_flag": stop, "ready_flag": ready},
        daemon=True,
        name=f"kopf-{node}",
    )
    thread.start()
    try:
        assert ready.wait(30), "kopf did not start"
        yield driver
    finally:
        stop.set()
        thread.join(30)
        api.close()  # type: ignore[no-untyped-call]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@contextmanager
def operator_process(
    kubeconfig: Path, shim_socket: Path, log: Path, node: str = NODE
) -> Iterator[subprocess.Popen[bytes]]:
    """bitbuilder-operator against the emulator; its liveness endpoint answering = started."""
    liveness = f"http://127.0.0.1:{free_port()}/healthz"
    argv = [
        str(Path(sys.executable).parent / "bitbuilder-operator"),
        "--kubeconfig", str(kubeconfig), "--socket", str(shim_socket),
        "--node-name", node, "--liveness", liveness,
    ]  # fmt: skip
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: healthy(liveness) or proc.poll() is not None, what="operator liveness")
        assert proc.poll() is None, log.read_text()[-3000:]
        yield proc
    finally:
        stop_process(proc, timeout=20)


def run_e2e(api: EmulatorThread, tmp_path: Path, **env: str) -> str:
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/e2e", "-q", "-rs", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env={**os.environ, "KUBECONFIG": str(kubeconfig), **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    return done.stdout
