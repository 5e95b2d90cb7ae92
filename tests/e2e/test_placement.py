"""Placement on a real cluster: the real kube-scheduler binds each Tenant's reservation pod and
only that node runs the machine (the same rules tests/kopf/test_placement.py shows against the
emulated API with a stand-in scheduler)."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from tests.e2e.conftest import KUBECONFIG, get_json, kubectl
from tests.e2e.test_cluster import manifest
from tests.helpers.wait import wait_for

NAMESPACE = "bitbuilder-system"
NEEDS_OPERATOR = pytest.mark.skipif(
    bool(KUBECONFIG) and not os.environ.get("BITBUILDER_E2E_REPO"),
    reason="set BITBUILDER_E2E_REPO (a tenant repo URL the nodes can fetch) with the operator "
    "running and a host shim on the nodes, to see tenants placed",
)


def operator_nodes() -> list[str]:
    """Ready nodes on which an operator pod is Ready."""
    pods = get_json("pods", "-n", NAMESPACE, "-l", "app.kubernetes.io/name=bitbuilder-operator")
    return sorted(
        p["spec"]["nodeName"]
        for p in pods["items"]
        if any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in p.get("status", {}).get("conditions", [])
        )
    )


@pytest.fixture
def two_nodes(tenant_name: str) -> list[str]:
    nodes = operator_nodes()
    if len(nodes) < 2:
        pytest.skip(f"needs two nodes running the operator; this cluster has {len(nodes)}")
    return nodes


def pod_of(name: str) -> dict[str, Any] | None:
    """The Tenant's reservation pod that is not being deleted."""
    pods = get_json("pods", "-n", NAMESPACE, "-l", f"bitbuilder.io/tenant={name}")["items"]
    return next((p for p in pods if not p["metadata"].get("deletionTimestamp")), None)


def running_on(name: str) -> str | None:
    tenant = get_json("tenant", name)
    status = tenant.get("status") or {}
    node = (status.get("machine") or {}).get("node")
    return node if status.get("phase") == "Running" else None


def source() -> dict[str, Any]:
    return {"url": os.environ["BITBUILDER_E2E_REPO"], "ref": {"branch": "main"}}


@NEEDS_OPERATOR
def test_an_unschedulable_tenant_is_stalled_with_the_schedulers_message(tenant_name: str) -> None:
    huge = {"memory": "64Ti"}
    kubectl("apply", "-f", "-", stdin=manifest(tenant_name, source=source(), resources=huge))
    kubectl("wait", "--for=condition=Stalled", "--timeout=120s", f"tenant/{tenant_name}")
    tenant = get_json("tenant", tenant_name)
    stalled = next(c for c in tenant["status"]["conditions"] if c["type"] == "Stalled")
    assert stalled["reason"] == "Unschedulable" and "nodes are available" in stalled["message"]
    assert tenant["status"]["phase"] == "Pending"


@NEEDS_OPERATOR
def test_placed_by_the_scheduler_moved_by_a_node_selector_and_placed_again(
    tenant_name: str, two_nodes: list[str]
) -> None:
    kubectl("apply", "-f", "-", stdin=manifest(tenant_name, source=source()))
    node = wait_for(lambda: running_on(tenant_name), 300, 1, "the tenant Running")
    pod = pod_of(tenant_name)
    assert pod is not None and pod["spec"]["nodeName"] == node
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "Tenant"
    row = kubectl("get", "tenant", tenant_name, "--no-headers").stdout.split()
    assert node in row

    other = next(n for n in two_nodes if n != node)
    hostname = get_json("node", other)["metadata"]["labels"]["kubernetes.io/hostname"]
    selector = {"spec": {"nodeSelector": {"kubernetes.io/hostname": hostname}}}
    kubectl("patch", "tenant", tenant_name, "--type=merge", "-p", json.dumps(selector))
    wait_for(lambda: running_on(tenant_name) == other, 300, 1, f"the tenant Running on {other}")

    kubectl("patch", "tenant", tenant_name, "--type=merge", "-p", '{"spec":{"nodeSelector":null}}')
    wait_for(lambda: running_on(tenant_name), 300, 1, "the tenant Running again")
    before = pod_of(tenant_name)
    assert before is not None
    kubectl("delete", "pod", "-n", NAMESPACE, before["metadata"]["name"], "--wait=false")
    again = wait_for(
        lambda: (
            (p := pod_of(tenant_name))
            and p["metadata"]["uid"] != before["metadata"]["uid"]
            and p["spec"].get("nodeName")
            and p
        ),
        300,
        1,
        "a new reservation pod, bound",
    )
    bound = again["spec"]["nodeName"]
    wait_for(lambda: running_on(tenant_name) == bound, 300, 1, "Running where it is bound")
    kubectl("delete", "tenant", tenant_name, "--wait=false")
    kubectl("wait", "--for=delete", "--timeout=120s", f"tenant/{tenant_name}")
