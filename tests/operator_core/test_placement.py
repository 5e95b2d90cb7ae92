"""Placement rules (operator/placement.py): the reservation pod and each node's verdict."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from bitbuilder.operator.api import TenantPhase
from bitbuilder.operator.placement import (
    PAUSE_IMAGE,
    Reservation,
    decide,
    live_pod,
    next_serial,
    pin_for,
    reservation_pod,
)
from bitbuilder.operator.status import find_condition, unplaced_status
from tests.operator_core.conftest import make_tenant

ME, THEM = "node1", "node2"


def test_the_pod_reserves_what_the_tenant_asks_and_nothing_more() -> None:
    tenant = make_tenant(
        resources={"cpu": "500m", "memory": "512Mi", "tasks": 64},
        nodeName=THEM,
        nodeSelector={"zone": "b"},
    )
    pod = reservation_pod(tenant, "uid-1")
    spec = pod["spec"]
    [container] = spec["containers"]
    assert container["image"] == PAUSE_IMAGE
    assert container["resources"] == {"requests": {"cpu": "500m", "memory": "512Mi"}}
    assert container["securityContext"]["privileged"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert spec["automountServiceAccountToken"] is False
    assert "nodeName" not in spec, "binding (and the capacity check) is the scheduler's"
    assert spec["nodeSelector"] == {"zone": "b"}
    [term] = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert term == {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [THEM]}]}
    [owner] = pod["metadata"]["ownerReferences"]
    assert owner == {
        "apiVersion": "bitbuilder.io/v1alpha1",
        "kind": "Tenant",
        "name": "web",
        "uid": "uid-1",
        "controller": True,
    }


def test_an_unplaced_tenant_has_no_constraints() -> None:
    spec = reservation_pod(make_tenant(), "u")["spec"]
    assert "affinity" not in spec and "nodeSelector" not in spec
    assert spec["containers"][0]["resources"] == {"requests": {}}


def bound(tenant_spec: dict[str, Any], node: str | None, pin: str | None = None) -> Reservation:
    pod = reservation_pod(make_tenant(**tenant_spec), "u", pin)
    pod["spec"]["nodeName"] = node
    return Reservation.from_pod(pod)


def test_only_the_bound_node_runs_it() -> None:
    tenant = make_tenant()
    assert decide(tenant, bound({}, ME), ME, None, False).run
    elsewhere = decide(tenant, bound({}, THEM), ME, None, False)
    assert not elsewhere.run and elsewhere.reason is None  # node2 reports, not us


def test_the_new_node_waits_for_the_holder_unless_it_is_lost() -> None:
    tenant = make_tenant()
    waiting = decide(tenant, bound({}, ME), ME, THEM, holder_lost=False)
    assert not waiting.run and waiting.reason == "WaitingForNode" and THEM in waiting.message
    assert decide(tenant, bound({}, ME), ME, THEM, holder_lost=True).run


def test_a_stale_pod_is_replaced_by_its_own_node_only() -> None:
    moved = make_tenant(nodeSelector={"zone": "b"})
    mine = decide(moved, bound({}, ME), ME, ME, False)
    assert not mine.run and mine.replace
    assert not decide(moved, bound({}, THEM), ME, THEM, False).replace
    assert decide(moved, bound({}, None), ME, None, False).replace  # unbound: anyone


def test_a_resize_keeps_the_placement() -> None:
    resized = make_tenant(resources={"memory": "1Gi"})
    assert decide(resized, bound({"resources": {"memory": "64Mi"}}, ME), ME, ME, False).run


def test_unschedulable_is_stalled_with_the_schedulers_words() -> None:
    pod = reservation_pod(make_tenant(), "u")
    message = "0/2 nodes are available: 2 Insufficient memory."
    pod["status"] = {
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": message,
            }
        ]
    }
    verdict = decide(make_tenant(), Reservation.from_pod(pod), ME, None, False)
    assert verdict.stalled and verdict.message == message
    assert verdict.reason is not None
    status = unplaced_status(
        make_tenant(), verdict.reason, verdict.message, verdict.stalled, datetime.now(UTC)
    )
    assert status.phase is TenantPhase.pending
    stalled = find_condition(status, "Stalled")
    assert stalled is not None and (stalled.status, stalled.reason) == ("True", "Unschedulable")


def test_node_loss_wait_pins_the_new_pod_to_the_lost_node() -> None:
    waits = make_tenant(nodeLoss="Wait")
    assert pin_for(waits, THEM) == THEM and pin_for(make_tenant(), THEM) is None
    pinned = reservation_pod(waits, "u", pin=THEM)
    terms = pinned["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert terms["nodeSelectorTerms"][0]["matchFields"][0]["values"] == [THEM]
    # Bound to the lost node once it is back: it runs there again, no re-placement.
    pod = Reservation.from_pod({**pinned, "spec": {**pinned["spec"], "nodeName": THEM}})
    assert decide(waits, pod, THEM, THEM, False).run
    assert not decide(waits, pod, THEM, THEM, False).replace


def test_a_terminating_pod_is_not_waited_for() -> None:
    """An evicted pod of a lost node stays Terminating: a new one, with the next name, places
    the tenant meanwhile."""
    old = reservation_pod(make_tenant(), "u", serial=0)
    old["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert live_pod([old]) is None and next_serial([old]) == 1
    new = reservation_pod(make_tenant(), "u", serial=next_serial([old]))
    assert new["metadata"]["name"] == "tenant-web-1"
    assert live_pod([old, new]) is new
    assert next_serial([]) == 0
