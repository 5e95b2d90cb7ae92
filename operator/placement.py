"""Placement on a fleet: one reservation Pod per Tenant, bound to a node by kube-scheduler.

The operator never picks a node (the way KubeVirt places a VM through its virt-launcher pod).
For each Tenant it keeps a small Pod in the operator's namespace: owned by the Tenant, the
pause image, no privilege, no API token, requesting the Tenant's cpu and memory, with the
Tenant's nodeName (as node affinity, so the scheduler still checks capacity) and nodeSelector.
The node the scheduler binds it to is the Tenant's node; only that node's operator runs the
machine, every other one stops any copy it has. `status.machine.node` names the node that last
ran the machine (the holder): a newly bound node starts only once the holder has stopped its
copy (and cleared the field) or is lost, so two nodes never run one Tenant at once.

Pure: the pod manifest and what one node's operator should do, given the pod it sees.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Protocol

from bitbuilder.operator.api import API_VERSION, KIND, NodeLoss, Tenant

PAUSE_IMAGE = "registry.k8s.io/pause:3.10"
TENANT_LABEL = "bitbuilder.io/tenant"
PLACEMENT_ANNOTATION = "bitbuilder.io/placement"
POD_PREFIX = "tenant-"
Obj = dict[str, Any]


class Pods(Protocol):
    """The API calls placement needs (kubeapi.KubePods; a fake in tests)."""

    async def of(self, tenant: str) -> list[Obj]: ...
    async def list(self) -> list[Obj]: ...
    async def create(self, pod: Obj) -> Obj: ...
    async def delete(self, name: str, uid: str) -> None: ...
    async def node_lost(self, name: str) -> bool: ...


def pod_name(tenant: str, serial: int) -> str:
    """`tenant-<name>-<serial>`: a new serial when the last pod is still terminating (a pod
    evicted from a lost node stays so until the node returns), as a ReplicaSet would not wait."""
    return f"{POD_PREFIX}{tenant}-{serial}"


def _serial(pod: Obj) -> int:
    suffix = pod["metadata"]["name"].rpartition("-")[2]
    return int(suffix) if suffix.isdigit() else -1


def live_pod(pods: list[Obj]) -> Obj | None:
    """The tenant's pod that is not being deleted (the newest, should there be two)."""
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    return max(live, key=_serial, default=None)


def next_serial(pods: list[Obj]) -> int:
    return 1 + max((_serial(p) for p in pods), default=-1)


def requests(tenant: Tenant) -> dict[str, str]:
    res = tenant.spec.resources
    wanted = {"cpu": res.cpu, "memory": res.memory}
    return {key: str(value) for key, value in wanted.items() if value is not None}


def placement_key(tenant: Tenant, pin: str | None) -> str:
    """What the pod's placement follows: a change means a new pod (its scheduling fields are
    immutable), so the tenant is placed again. Not its size: a resize must not move a tenant
    (and lose its local data); the pod keeps the requests it was placed with until the tenant
    is placed again."""
    inputs = {
        "nodeName": tenant.spec.node_name,
        "nodeSelector": tenant.spec.node_selector,
        "pin": pin,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _affinity(nodes: list[str]) -> Obj:
    """Node names as required affinity (matchFields on metadata.name, as DaemonSets do): unlike
    spec.nodeName it leaves binding, and so the capacity check, to the scheduler."""
    term = {"matchFields": [{"key": "metadata.name", "operator": "In", "values": nodes}]}
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}
        }
    }


def reservation_pod(tenant: Tenant, uid: str, pin: str | None = None, serial: int = 0) -> Obj:
    """The reservation Pod for a Tenant; `pin` keeps it on that node (NodeLoss Wait)."""
    name = tenant.metadata.name
    nodes = sorted({n for n in (tenant.spec.node_name, pin) if n is not None})
    spec: Obj = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 0,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 65535,
            "runAsGroup": 65535,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": "reserve",
                "image": PAUSE_IMAGE,
                "resources": {"requests": requests(tenant)},
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "privileged": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]},
                },
            }
        ],
    }
    if tenant.spec.node_selector:
        spec["nodeSelector"] = dict(tenant.spec.node_selector)
    if nodes:
        spec["affinity"] = _affinity(nodes)
    owner = {"apiVersion": API_VERSION, "kind": KIND, "name": name, "uid": uid, "controller": True}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(name, serial),
            "labels": {TENANT_LABEL: name, "app.kubernetes.io/name": "bitbuilder-tenant"},
            "annotations": {PLACEMENT_ANNOTATION: placement_key(tenant, pin)},
            "ownerReferences": [owner],
        },
        "spec": spec,
    }


@dataclass(frozen=True)
class Reservation:
    """What a reservation pod says: its node once bound, and why it is not (the scheduler's
    own message)."""

    name: str
    uid: str
    node: str | None
    key: str | None
    unschedulable: str | None = None

    @classmethod
    def from_pod(cls, pod: Obj) -> Reservation:
        meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
        message = None
        for cond in (pod.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("reason") == "Unschedulable":
                message = cond.get("message") or "no node fits"
        return cls(
            name=meta.get("name", ""),
            uid=meta.get("uid", ""),
            node=spec.get("nodeName") or None,
            key=(meta.get("annotations") or {}).get(PLACEMENT_ANNOTATION),
            unschedulable=message,
        )

    def current(self, tenant: Tenant, pin: str | None) -> bool:
        """Placed for the tenant as it is now; a pinned pod stays current while pinned."""
        return self.key in (placement_key(tenant, None), placement_key(tenant, pin))


def pin_for(tenant: Tenant, holder: str | None) -> str | None:
    """The node a new pod must wait for: the holder, when the tenant waits for a lost node."""
    return holder if tenant.spec.node_loss is NodeLoss.wait else None


@dataclass(frozen=True)
class Verdict:
    """What one node's operator does with a tenant.

    run: the machine runs here; otherwise any copy here is stopped. replace: the pod is stale
    and this operator removes it (after stopping its copy). reason/message: why it runs
    nowhere yet, when this operator is the one to report it (unset: another node runs it, or
    reports); stalled: only a change from someone helps (the scheduler finds no node)."""

    run: bool
    replace: bool = False
    reason: str | None = None
    message: str = ""
    stalled: bool = False


def decide(
    tenant: Tenant, pod: Reservation, me: str, holder: str | None, holder_lost: bool
) -> Verdict:
    """`holder`: status.machine.node; `holder_lost`: that node is gone or NotReady."""
    if not pod.current(tenant, pin_for(tenant, holder)):
        if pod.node not in (None, me):
            return Verdict(run=False)  # its node stops the machine, then replaces the pod
        return Verdict(run=False, replace=True, reason="Placing", message="placing it again")
    if pod.node is None:
        if pod.unschedulable is not None:
            return Verdict(False, reason="Unschedulable", message=pod.unschedulable, stalled=True)
        message = "waiting for the scheduler to bind its reservation pod"
        return Verdict(run=False, reason="Scheduling", message=message)
    if pod.node != me:
        return Verdict(run=False)
    if holder not in (None, me) and not holder_lost:
        message = f"placed on node {me}; waiting for node {holder} to stop the machine"
        return Verdict(run=False, reason="WaitingForNode", message=message)
    return Verdict(run=True)
