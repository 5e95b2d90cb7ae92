"""spec.nodeLoss: Wait, with two operators and in-memory shims (the real-shim fleet tests are in
test_placement.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bitbuilder.hostshim.api import MachinePhase
from tests.helpers.kube_emulator import EmulatorThread
from tests.helpers.kube_http import TENANTS, Kube
from tests.helpers.wait import wait_for
from tests.kopf.support import (
    NODE,
    PODS,
    SHA_A,
    FakeShimServer,
    add_node,
    condition,
    operator_thread,
    pod_of,
    set_ready,
    status_where,
    tenant,
)

OTHER = "node2"


@pytest.fixture
def shims(tmp_path: Path, kube: Kube) -> Iterator[dict[str, FakeShimServer]]:
    add_node(kube, OTHER)
    servers = {node: FakeShimServer(tmp_path / f"{node}.sock") for node in (NODE, OTHER)}
    for server in servers.values():
        server.fake.heads["web"] = SHA_A
        server.thread.start()
        server.up()
    try:
        yield servers
    finally:
        for server in servers.values():
            server.down()
            server.thread.stop()


def runs(server: FakeShimServer) -> bool:
    machine = server.fake.machines.get("web")
    return machine is not None and machine.phase is MachinePhase.running


@pytest.mark.slow
def test_wait_keeps_the_tenant_for_its_lost_node(
    api: EmulatorThread, kube: Kube, shims: dict[str, FakeShimServer]
) -> None:
    with operator_thread(api.url, shims[OTHER].fake.socket, OTHER):
        with operator_thread(api.url, shims[NODE].fake.socket, NODE):
            kube.ok("POST", TENANTS, tenant(nodeLoss="Wait"))  # both empty: node1 by name
            wait_for(lambda: status_where(kube, "web", phase="Running"), what="web Running")
            assert runs(shims[NODE]) and "web" not in shims[OTHER].fake.machines
        # node1 is lost: NotReady, its pod evicted. The new pod waits for node1, node2 idles.
        set_ready(kube, NODE, False)
        kube.ok("DELETE", f"{PODS}/{(pod_of(kube, 'web') or {})['metadata']['name']}")
        # Pending comes first ('waiting for the scheduler'); the scheduler's verdict follows.
        pending = wait_for(
            lambda: _unschedulable(status_where(kube, "web", phase="Pending")),
            what="web Pending for node1, unschedulable elsewhere",
        )
        assert "didn't match" in condition(pending, "Ready")["message"]
        pod = pod_of(kube, "web")
        assert pod is not None and not pod["spec"].get("nodeName")
        assert "web" not in shims[OTHER].fake.machines
        # node1 returns: the pod binds there and it runs there again (on its own data).
        set_ready(kube, NODE, True)
        with operator_thread(api.url, shims[NODE].fake.socket, NODE):
            back = wait_for(lambda: status_where(kube, "web", phase="Running"), what="web back")
            assert back["status"]["machine"]["node"] == NODE
            assert runs(shims[NODE]) and "web" not in shims[OTHER].fake.machines


def _unschedulable(obj: dict[str, Any] | None) -> dict[str, Any] | None:
    return obj if "didn't match" in condition(obj, "Ready").get("message", "") else None
