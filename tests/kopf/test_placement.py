"""A fleet of two nodes: two operators, each driving its own real host shim (its own network
namespace, state, runtime and socket dirs, so its own cgroups, links and nftables) with real
nspawn machines, against the emulated API; the stand-in scheduler binds reservation pods as
kube-scheduler would."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bitbuilder.hostshim.api import MachinePhase
from bitbuilder.operator.placement import PAUSE_IMAGE, TENANT_LABEL
from tests.helpers.gitserve import git_daemon
from tests.helpers.kube_emulator import EmulatorThread
from tests.helpers.kube_http import TENANTS, Kube
from tests.helpers.wait import wait_for
from tests.kopf.conftest import Kubectl
from tests.kopf.support import (
    NODE,
    PODS,
    add_node,
    condition,
    event_reasons,
    operator_thread,
    pod_of,
    set_ready,
    stalled_tenant,
    status_where,
)
from tests.standalone.conftest import REAL_HOST, Host, tenant_manifest

pytestmark = [*REAL_HOST, pytest.mark.slow]
OTHER = "node2"
ZONES = {NODE: "a", OTHER: "b"}


@contextlib.contextmanager
def network_namespace(name: str) -> Iterator[str]:
    """A node's own network namespace (its loopback up), deleted with whatever is left in it."""
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def fleet(tmp_path: Path, busybox_rootfs: Path, kube: Kube) -> Iterator[dict[str, Host]]:
    """node1 (zone a, from the api fixture) and node2 (zone b), each with its own shim in its
    own network namespace (so its own links, nftables and machine addresses). The tenant repos
    live under node1's git folder; both shims read them as file:// repos, the way two hosts
    would reach one git server."""
    kube.merge(f"/api/v1/nodes/{NODE}", {"metadata": {"labels": {"zone": "a"}}})
    add_node(kube, OTHER, zone="b")
    hosts: dict[str, Host] = {}
    repos = tmp_path / NODE / "git"
    with contextlib.ExitStack() as stack:
        try:
            for node in (NODE, OTHER):
                root = tmp_path / node
                (root / "git").mkdir(parents=True)
                server = stack.enter_context(git_daemon(root / "git"))
                netns = stack.enter_context(network_namespace(f"bb-{tmp_path.name[-8:]}-{node}"))
                hosts[node] = Host(root, server, busybox_rootfs)
                hosts[node].start_shim("--file-source-root", str(repos), netns=netns)
                shim_pid = hosts[node].procs.children[-1][1].pid
                assert os.readlink(f"/proc/{shim_pid}/ns/net") == _netns_id(netns)
            yield hosts
        finally:
            for host in hosts.values():
                host.teardown()


def _netns_id(name: str) -> str:
    return f"net:[{os.stat(f'/run/netns/{name}').st_ino}]"


def repo_url(fleet: dict[str, Host], name: str) -> str:
    return f"file://{fleet[NODE].git.base}/{name}.git"


def running(host: Host, name: str) -> bool:
    machine = host.machine(name)
    return machine is not None and machine.phase is MachinePhase.running


def running_on(kube: Kube, name: str, node: str) -> dict[str, Any] | None:
    obj = status_where(kube, name, phase="Running")
    machine = ((obj or {}).get("status") or {}).get("machine") or {}
    return obj if machine.get("node") == node else None


class CopyWatch:
    """Polls both shims throughout: a copy seen on one node while the other's copy is seen
    running just before and just after is two copies at one moment."""

    def __init__(self, hosts: dict[str, Host], name: str) -> None:
        self.hosts, self.name = list(hosts.values()), name
        self.samples = 0
        self.overlaps: list[float] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="copy-watch")

    def __enter__(self) -> CopyWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(30)

    def _run(self) -> None:
        first, second = self.hosts
        while not self.stopping.is_set():
            before = running(first, self.name)
            other = running(second, self.name)
            after = running(first, self.name)
            self.samples += 1
            if before and other and after:
                self.overlaps.append(time.monotonic())


def test_placed_on_one_node_moved_and_replaced_never_two_copies(
    api: EmulatorThread, kube: Kube, fleet: dict[str, Host], kubectl: Kubectl
) -> None:
    fleet[NODE].tenant_repo("web", "v1")
    url = repo_url(fleet, "web")
    with (
        operator_thread(api.url, fleet[NODE].socket, NODE),
        operator_thread(api.url, fleet[OTHER].socket, OTHER),
        CopyWatch(fleet, "web") as copies,
    ):
        # No placement: the scheduler picks one node, and only that node runs it.
        created = kube.ok("POST", TENANTS, tenant_manifest("web", url, interval="1h"))
        first = wait_for(lambda: status_where(kube, "web", phase="Running"), timeout=120)
        node = first["status"]["machine"]["node"]
        other = OTHER if node == NODE else NODE
        assert running(fleet[node], "web") and fleet[other].machine("web") is None
        pod = pod_of(kube, "web")
        assert pod is not None and pod["spec"]["nodeName"] == node
        assert pod["metadata"]["labels"][TENANT_LABEL] == "web"
        [owner] = pod["metadata"]["ownerReferences"]
        assert owner["uid"] == created["metadata"]["uid"] and owner["kind"] == "Tenant"
        [container] = pod["spec"]["containers"]
        assert container["image"] == PAUSE_IMAGE
        assert container["resources"]["requests"] == {"memory": "64Mi"}
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert pod["spec"]["automountServiceAccountToken"] is False
        row = kubectl("get", "tenants", "--no-headers").split()
        assert row[:5] == ["web", "nspawn", "Running", first["status"]["shortRevision"], node]

        # Its pod deleted (evicted, drained) while other workloads fill its node: placed again
        # on the other node, which starts it only once the first has stopped its copy.
        kube.ok("POST", PODS, workload(node, memory="8Gi"))
        kube.ok("DELETE", f"{PODS}/{pod['metadata']['name']}")
        wait_for(lambda: running_on(kube, "web", other), timeout=120, what=f"web on {other}")
        assert fleet[node].machine("web") is None
        replaced = pod_of(kube, "web")
        assert replaced is not None and replaced["metadata"]["uid"] != pod["metadata"]["uid"]
        kube.ok("DELETE", f"{PODS}/workload")

        # A nodeSelector for the first node moves it back: stopped there, then started here.
        kube.merge(f"{TENANTS}/web", {"spec": {"nodeSelector": {"zone": ZONES[node]}}})
        wait_for(lambda: running_on(kube, "web", node), timeout=120, what=f"web on {node}")
        assert running(fleet[node], "web") and fleet[other].machine("web") is None
        moved = pod_of(kube, "web")
        assert moved is not None and moved["spec"]["nodeName"] == node
        assert moved["spec"]["nodeSelector"] == {"zone": ZONES[node]}

        # No node fits: Pending, Stalled with the scheduler's own words; it runs nowhere.
        kube.merge(f"{TENANTS}/web", {"spec": {"nodeSelector": {"zone": "c"}}})
        stalled = wait_for(lambda: stalled_tenant(kube, "web"), timeout=60, what="Stalled")
        assert stalled["status"]["phase"] == "Pending"
        assert condition(stalled, "Stalled")["reason"] == "Unschedulable"
        assert "didn't match Pod's node affinity/selector" in condition(stalled, "Ready")["message"]
        assert all(host.machine("web") is None for host in fleet.values())
        wait_for(lambda: "Unschedulable" in event_reasons(kube, "web"), what="the Event")

        # Deleted: the node running it removes the machine before the Tenant goes.
        kube.ok("DELETE", f"{TENANTS}/web")
        wait_for(lambda: kube.get(f"{TENANTS}/web") is None, timeout=60, what="web deleted")
        assert all(host.machine("web") is None for host in fleet.values())
        wait_for(lambda: pod_of(kube, "web") is None, what="its pod collected with it")
    assert copies.samples > 50, copies.samples
    assert not copies.overlaps, f"two copies of web ran at once {len(copies.overlaps)} times"


def workload(node: str, memory: str) -> dict[str, Any]:
    """Some other workload's pod, running on `node`."""
    container = {"name": "app", "image": "app", "resources": {"requests": {"memory": memory}}}
    return {
        "metadata": {"name": "workload"},
        "spec": {"nodeName": node, "containers": [container]},
    }


def test_a_lost_node_returns_and_stops_its_stale_copy_and_deletion_survives_a_lost_node(
    api: EmulatorThread, kube: Kube, fleet: dict[str, Host]
) -> None:
    fleet[NODE].tenant_repo("web", "v1")
    url = repo_url(fleet, "web")
    with operator_thread(api.url, fleet[OTHER].socket, OTHER):
        with operator_thread(api.url, fleet[NODE].socket, NODE):
            # Both nodes are empty: the stand-in scheduler takes the first by name.
            kube.ok("POST", TENANTS, tenant_manifest("web", url, interval="1h"))
            wait_for(lambda: running_on(kube, "web", NODE), timeout=120, what="web on node1")
        # node1 is cut off: its operator is gone, its machine still runs. The node lifecycle
        # controller marks it NotReady and evicts its pod.
        assert running(fleet[NODE], "web")
        set_ready(kube, NODE, False)
        kube.ok("DELETE", f"{PODS}/{(pod_of(kube, 'web') or {})['metadata']['name']}")
        wait_for(lambda: running_on(kube, "web", OTHER), timeout=120, what="web on node2")

        # node1 returns: before anything else its operator stops the copy it no longer owns.
        set_ready(kube, NODE, True)
        with operator_thread(api.url, fleet[NODE].socket, NODE):
            wait_for(lambda: fleet[NODE].machine("web") is None, timeout=60, what="stale copy")
            assert running(fleet[OTHER], "web")
            assert running_on(kube, "web", OTHER)
    # node2 is lost for good (operator gone, Node deleted); the Tenant can still be deleted.
    kube.ok("DELETE", f"/api/v1/nodes/{OTHER}")
    with operator_thread(api.url, fleet[NODE].socket, NODE):
        kube.ok("DELETE", f"{TENANTS}/web")
        wait_for(lambda: kube.get(f"{TENANTS}/web") is None, timeout=60, what="web deleted")
    # node2 comes back (a stale copy of a Tenant that no longer exists): stopped at start-up.
    assert running(fleet[OTHER], "web")
    with operator_thread(api.url, fleet[OTHER].socket, OTHER):
        wait_for(lambda: fleet[OTHER].machine("web") is None, timeout=60, what="stale copy")
