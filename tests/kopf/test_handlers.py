"""Driver rules that need no API server: the finalizer on a node the machine does not run on."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, cast

import kopf
import pytest
from kubernetes import client as k8s

from bitbuilder.operator.handlers import Driver
from bitbuilder.operator.kubeapi import KubeSecrets, StatusWriter
from bitbuilder.operator.reconcile import Node
from bitbuilder.operator.shimclient import ShimClient


def driver(tmp_path: Path) -> Driver:
    """A driver whose shim and API are unreachable: any call to them would fail the test."""
    api = k8s.ApiClient(k8s.Configuration(host="http://127.0.0.1:9"))
    shim = ShimClient(tmp_path / "absent.sock", timeout=1)
    return Driver(shim, KubeSecrets(api), StatusWriter(api), Node("node1"))


def body(machine_node: str | None) -> kopf.Body:
    obj: dict[str, Any] = {
        "apiVersion": "bitbuilder.io/v1alpha1",
        "kind": "Tenant",
        "metadata": {"name": "web", "generation": 1},
        "spec": {"image": {"name": "base"}, "nodeName": "node2"},
    }
    if machine_node is not None:
        obj["status"] = {"machine": {"node": machine_node}}
    return kopf.Body(cast(Any, obj))


def test_another_nodes_machine_keeps_the_finalizer(tmp_path: Path) -> None:
    with pytest.raises(kopf.TemporaryError, match="node2"):
        asyncio.run(driver(tmp_path).remove(body("node2"), logging.getLogger("test")))


def test_a_tenant_placed_elsewhere_without_a_machine_is_released(tmp_path: Path) -> None:
    asyncio.run(driver(tmp_path).remove(body(None), logging.getLogger("test")))
