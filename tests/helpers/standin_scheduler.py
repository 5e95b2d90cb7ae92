"""A test-only stand-in for kube-scheduler (the product ships no scheduler).

It binds the pending pods of one namespace through the `binding` subresource, as the real
scheduler does, to a Ready node that fits: the pod's nodeSelector, its required node affinity
(matchFields on metadata.name, matchExpressions In on labels) and its cpu/memory requests
within the node's allocatable minus what is already bound there. The fitting node with the
fewest pods wins (then by name). A pod no node fits gets `PodScheduled=False, Unschedulable`
with a message in the scheduler's words. It runs in a thread and reacts to pod changes through
a watch (node changes are noticed within a second, the watch's timeout).
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import urllib.parse
from decimal import Decimal
from typing import Any

from bitbuilder.hostshim.api import parse_quantity
from tests.helpers.kube_http import Kube

Obj = dict[str, Any]


def _ready(node: Obj) -> bool:
    conditions = (node.get("status") or {}).get("conditions") or []
    ready = next((c for c in conditions if c.get("type") == "Ready"), None)
    return ready is None or ready.get("status") == "True"


def _requests(pod: Obj) -> dict[str, Decimal]:
    total: dict[str, Decimal] = {}
    for container in pod["spec"].get("containers", []):
        for key, value in ((container.get("resources") or {}).get("requests") or {}).items():
            total[key] = total.get(key, Decimal(0)) + parse_quantity(value)
    return total


def _term_matches(term: Obj, node: Obj) -> bool:
    labels = node["metadata"].get("labels") or {}
    for field in term.get("matchFields") or []:
        if field["key"] != "metadata.name" or field["operator"] != "In":
            return False
        if node["metadata"]["name"] not in field["values"]:
            return False
    for expr in term.get("matchExpressions") or []:
        if expr["operator"] != "In" or labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def _selected(pod: Obj, node: Obj) -> bool:
    labels = node["metadata"].get("labels") or {}
    spec = pod["spec"]
    if any(labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
        return False
    required = (
        ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
            "requiredDuringSchedulingIgnoredDuringExecution"
        )
        or {}
    ).get("nodeSelectorTerms")
    return not required or any(_term_matches(term, node) for term in required)


class StandInScheduler:
    def __init__(self, url: str, namespace: str) -> None:
        self.kube = Kube(url)
        self.pods = f"/api/v1/namespaces/{namespace}/pods"
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="standin-scheduler")
        self.bindings: list[tuple[str, str]] = []  # (pod, node), in order
        self.watching: http.client.HTTPConnection | None = None

    def start(self) -> StandInScheduler:
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop at once: the watch it waits on is cut."""
        self.stopping.set()
        with contextlib.suppress(OSError):
            if self.watching is not None and self.watching.sock is not None:
                self.watching.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(10)

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                self._wait_for_change(self.schedule_once())
            except (OSError, http.client.HTTPException):
                if self.stopping.is_set():
                    return
                raise

    def _wait_for_change(self, version: str) -> None:
        """Until the first pod event after `version`, or a second (node changes)."""
        url = urllib.parse.urlsplit(self.kube.url)
        self.watching = http.client.HTTPConnection(url.netloc, timeout=30)
        try:
            query = f"watch=true&resourceVersion={version}&timeoutSeconds=1"
            self.watching.request("GET", f"{self.pods}?{query}")
            self.watching.getresponse().readline()
        finally:
            self.watching.close()

    def schedule_once(self) -> str:
        """One pass over the pending pods; the pod list's resourceVersion."""
        listed = self.kube.ok("GET", self.pods)
        nodes = [n for n in self.kube.ok("GET", "/api/v1/nodes")["items"] if _ready(n)]
        pods = listed["items"]
        for pod in pods:
            if not pod["spec"].get("nodeName") and not pod["metadata"].get("deletionTimestamp"):
                self._schedule(pod, pods, nodes)
        return str(listed["metadata"]["resourceVersion"])

    def _schedule(self, pod: Obj, pods: list[Obj], nodes: list[Obj]) -> None:
        wanted = _requests(pod)
        unmatched, short = 0, {key: 0 for key in wanted}
        fits: list[tuple[int, str]] = []
        for node in nodes:
            name = node["metadata"]["name"]
            if not _selected(pod, node):
                unmatched += 1
                continue
            bound = [p for p in pods if p["spec"].get("nodeName") == name]
            allocatable = (node.get("status") or {}).get("allocatable") or {}
            lacking = [
                key
                for key, amount in wanted.items()
                if key in allocatable
                and sum((_requests(p).get(key, Decimal(0)) for p in bound), amount)
                > parse_quantity(allocatable[key])
            ]
            for key in lacking:
                short[key] += 1
            if not lacking:
                fits.append((len(bound), name))
        name = pod["metadata"]["name"]
        if fits:
            chosen = min(fits)[1]
            binding = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
                       "target": {"apiVersion": "v1", "kind": "Node", "name": chosen}}  # fmt: skip
            code, _ = self.kube.request("POST", f"{self.pods}/{name}/binding", binding)
            if code < 300:
                pod["spec"]["nodeName"] = chosen  # counted for the next pod of this pass
                self.bindings.append((name, chosen))
            return
        reasons = [f"{unmatched} node(s) didn't match Pod's node affinity/selector"] * bool(
            unmatched
        ) + [f"{n} Insufficient {key}" for key, n in short.items() if n]
        message = f"0/{len(nodes)} nodes are available: {', '.join(reasons) or 'no nodes'}."
        condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                     "message": message}  # fmt: skip
        if (pod.get("status") or {}).get("conditions") != [condition]:
            status = {"status": {"phase": "Pending", "conditions": [condition]}}
            self.kube.request(
                "PATCH", f"{self.pods}/{name}/status", status,
                content_type="application/merge-patch+json",
            )  # fmt: skip
