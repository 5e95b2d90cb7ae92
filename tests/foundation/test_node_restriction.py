"""The operator's node restriction (manifests/base/admission.yaml), evaluated with cel-python the
way the API server evaluates a ValidatingAdmissionPolicy: a node's credentials act for that node
only. The emulated API stores the policy but does not enforce it; this test checks its rules
against what the operator really sends (placement.reservation_pod, status writes)."""

from __future__ import annotations

import copy
from typing import Any

import celpy
import pytest
from celpy.adapter import json_to_cel

from bitbuilder.operator.api import Tenant
from bitbuilder.operator.placement import reservation_pod
from tests.foundation.conftest import REPO, load_documents

Obj = dict[str, Any]
OPERATOR = "system:serviceaccount:bitbuilder-system:bitbuilder-operator"
NODE_KEY = "authentication.kubernetes.io/node-name"


@pytest.fixture(scope="module")
def policy() -> Obj:
    [found] = [
        d
        for d in load_documents(REPO / "manifests" / "base" / "admission.yaml")
        if d["kind"] == "ValidatingAdmissionPolicy"
    ]
    return found


def _run(expression: str, activation: Obj) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(expression)).evaluate(activation)


def denials(policy: Obj, request: Obj, obj: Obj | None, old: Obj | None) -> list[str]:
    """The messages of the rules that refuse this request (none: admitted)."""
    activation: Obj = {
        "request": json_to_cel(request),
        "object": json_to_cel(obj),
        "oldObject": json_to_cel(old),
    }
    spec = policy["spec"]
    if not all(bool(_run(c["expression"], activation)) for c in spec["matchConditions"]):
        return []
    activation["variables"] = json_to_cel(
        {v["name"]: _run(v["expression"], activation) for v in spec["variables"]}
    )
    return [
        v["message"] for v in spec["validations"] if not bool(_run(v["expression"], activation))
    ]


def request(
    operation: str, resource: str, subresource: str = "", node: str | None = "node1"
) -> Obj:
    extra = {NODE_KEY: [node]} if node else {}
    return {
        "operation": operation,
        "resource": {"group": "", "version": "v1", "resource": resource},
        "subResource": subresource,
        "userInfo": {"username": OPERATOR, "extra": extra},
    }


TENANT = Tenant.from_object(
    {
        "apiVersion": "bitbuilder.io/v1alpha1",
        "kind": "Tenant",
        "metadata": {"name": "web"},
        "spec": {"image": {"name": "base"}, "nodeSelector": {"zone": "a"}},
    }
)


def test_the_operators_own_reservation_pod_is_admitted_and_others_are_not(policy: Obj) -> None:
    pod = reservation_pod(TENANT, "uid-1")
    assert denials(policy, request("CREATE", "pods"), pod, None) == []
    for change in (
        {"nodeName": "node1"},
        {"hostNetwork": True},
        {"volumes": [{"name": "root", "hostPath": {"path": "/"}}]},
        {"automountServiceAccountToken": True},
    ):
        bad = copy.deepcopy(pod)
        bad["spec"].update(change)
        assert denials(policy, request("CREATE", "pods"), bad, None), change
    other_image = copy.deepcopy(pod)
    other_image["spec"]["containers"][0]["image"] = "attacker/miner"
    assert denials(policy, request("CREATE", "pods"), other_image, None)


def test_a_node_deletes_only_unbound_pods_and_its_own(policy: Obj) -> None:
    pod = reservation_pod(TENANT, "uid-1")
    assert denials(policy, request("DELETE", "pods"), None, pod) == []
    mine = {**pod, "spec": {**pod["spec"], "nodeName": "node1"}}
    theirs = {**pod, "spec": {**pod["spec"], "nodeName": "node2"}}
    assert denials(policy, request("DELETE", "pods"), None, mine) == []
    assert denials(policy, request("DELETE", "pods"), None, theirs)


def test_tenant_spec_is_never_changed_and_status_names_only_the_own_node(policy: Obj) -> None:
    old = TENANT.model_dump(mode="json", by_alias=True, exclude_none=True)
    annotated = copy.deepcopy(old)
    annotated["metadata"]["finalizers"] = ["bitbuilder.io/machine"]
    assert denials(policy, request("UPDATE", "tenants"), annotated, old) == []
    moved = copy.deepcopy(old)
    moved["spec"]["nodeName"] = "node2"
    assert denials(policy, request("UPDATE", "tenants"), moved, old)

    def status(node: str | None) -> Obj:
        body = copy.deepcopy(old)
        body["status"] = {"phase": "Running", "machine": {"node": node} if node else {}}
        return body

    update = request("UPDATE", "tenants", "status")
    assert denials(policy, update, status("node1"), status("node2")) == []  # taking over: bound
    assert denials(policy, update, status(None), status("node1")) == []  # releasing
    assert denials(policy, update, status("node2"), status("node2")) == []  # not touching it
    assert denials(policy, update, status("node2"), status(None))  # naming another node


def test_a_token_without_a_node_is_refused_and_other_users_are_not_concerned(
    policy: Obj,
) -> None:
    pod = reservation_pod(TENANT, "uid-1")
    assert denials(policy, request("CREATE", "pods", node=None), pod, None)
    someone = request("DELETE", "pods")
    someone["userInfo"] = {"username": "kubernetes-admin", "extra": {}}
    theirs = {**pod, "spec": {**pod["spec"], "nodeName": "node2"}}
    assert denials(policy, someone, None, theirs) == []
