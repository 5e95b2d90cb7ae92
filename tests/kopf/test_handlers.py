"""Driver rules that need no API server: who may release the finalizer, and when."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, cast

import kopf
import pytest
from kubernetes import client as k8s

from bitbuilder.hostshim.api import MachineSpec
from bitbuilder.operator.handlers import Driver
from bitbuilder.operator.kubeapi import KubeSecrets, StatusWriter
from bitbuilder.operator.placement import TENANT_LABEL, Obj
from bitbuilder.operator.reconcile import Node
from bitbuilder.operator.shimclient import ShimClient
from tests.helpers.fakeshim import running_fake_shim


class FakePods:
    """The placement calls, answered from a dict: `bound` is the pod's node; `lost` nodes;
    `listed` what a list of the reservation pods shows."""

    def __init__(self, bound: str | None, lost: set[str], listed: list[Obj] | None = None) -> None:
        self.bound, self.lost, self.listed = bound, lost, listed or []

    async def of(self, tenant: str) -> list[Obj]:
        return [{"metadata": {"name": f"tenant-{tenant}-0", "uid": "u1"},
                 "spec": {"nodeName": self.bound}}]  # fmt: skip

    async def list(self) -> list[Obj]:
        return self.listed

    async def create(self, pod: Obj) -> Obj:
        raise AssertionError("no pod is created while deleting")

    async def delete(self, name: str, uid: str) -> None:
        raise AssertionError("no pod is deleted while deleting")

    async def node_lost(self, name: str) -> bool:
        return name in self.lost


def driver(socket: Path, pods: FakePods) -> Driver:
    """node1's driver; its status writes go nowhere (an unreachable API answers 404 never)."""
    api = k8s.ApiClient(k8s.Configuration(host="http://127.0.0.1:9"))
    shim = ShimClient(socket, timeout=1)
    return Driver(shim, KubeSecrets(api), StatusWriter(api), Node("node1"), pods)


def body(machine_node: str | None) -> kopf.Body:
    obj: dict[str, Any] = {
        "apiVersion": "bitbuilder.io/v1alpha1",
        "kind": "Tenant",
        "metadata": {"name": "web", "generation": 1, "uid": "t1"},
        "spec": {"image": {"name": "base"}},
    }
    if machine_node is not None:
        obj["status"] = {"machine": {"node": machine_node}}
    return kopf.Body(cast(Any, obj))


def remove(socket: Path, pods: FakePods, machine_node: str | None) -> None:
    async def main() -> None:
        async with running_fake_shim(socket):
            node1 = driver(socket, pods)
            try:
                await node1.remove(body(machine_node), logging.getLogger("test"))
            finally:
                await node1.shim.close()

    asyncio.run(main())


def test_a_machine_on_another_live_node_keeps_the_finalizer(tmp_path: Path) -> None:
    with pytest.raises(kopf.TemporaryError, match="node2"):
        remove(tmp_path / "shim.sock", FakePods("node2", lost=set()), "node2")


def test_a_pod_bound_to_another_live_node_keeps_the_finalizer(tmp_path: Path) -> None:
    """Bound but not yet reported running there: that node may be starting it."""
    with pytest.raises(kopf.TemporaryError, match="node2"):
        remove(tmp_path / "shim.sock", FakePods("node2", lost=set()), None)


def test_a_tenant_on_a_lost_node_is_released(tmp_path: Path) -> None:
    remove(tmp_path / "shim.sock", FakePods("node2", lost={"node2"}), "node2")


def test_a_tenant_never_placed_is_released(tmp_path: Path) -> None:
    remove(tmp_path / "shim.sock", FakePods(None, lost=set()), None)


def test_start_up_stops_the_copies_this_node_does_not_own(tmp_path: Path) -> None:
    """Its pod bound elsewhere, or no pod (no Tenant) at all: stopped; bound here: kept."""
    socket = tmp_path / "shim.sock"

    def pod(tenant: str, node: str) -> Obj:
        return {"metadata": {"labels": {TENANT_LABEL: tenant}}, "spec": {"nodeName": node}}

    pods = FakePods(None, set(), [pod("web", "node1"), pod("api", "node2")])

    async def main() -> list[str]:
        async with running_fake_shim(socket) as fake:
            node1 = driver(socket, pods)
            try:
                for name in ("web", "api", "gone"):
                    await node1.shim.apply(MachineSpec(name=name, image="base"))
                await node1.stop_strays(logging.getLogger("test"))
            finally:
                await node1.shim.close()
            return sorted(fake.machines)

    assert asyncio.run(main()) == ["web"]
