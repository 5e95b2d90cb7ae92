"""`bitbuilder-operator` as a process: killed mid-reconcile, restarted, it converges."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from bitbuilder.hostshim.api import MachineSpec, MachineStatus
from tests.helpers.kube_emulator import EmulatorThread
from tests.helpers.kube_http import TENANTS, Kube
from tests.helpers.wait import wait_for
from tests.kopf.support import NODE, SHA_A, FakeShimServer, operator_process, status_where, tenant


@pytest.mark.slow
def test_killed_mid_reconcile_then_restarted_converges(
    api: EmulatorThread, kube: Kube, shim: FakeShimServer, tmp_path: Path
) -> None:
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    log = tmp_path / "operator.log"
    shim.fake.heads["web"] = SHA_A
    release = threading.Event()
    answer = shim.fake.status_for

    def held(spec: MachineSpec) -> MachineStatus:
        release.wait(30)  # the shim is busy with this PUT until the operator has been killed
        return answer(spec)

    shim.fake.status_for = held  # type: ignore[method-assign]
    try:
        # Placed by nodeSelector: the (stand-in) scheduler reads the Node's labels.
        kube.merge(f"/api/v1/nodes/{NODE}", {"metadata": {"labels": {"zone": "a"}}})
        with operator_process(kubeconfig, shim.fake.socket, log) as first:
            kube.ok("POST", TENANTS, tenant(nodeSelector={"zone": "a"}))
            wait_for(lambda: ("PUT", "web") in shim.fake.requests, what="the PUT to the shim")
            first.kill()
            first.wait()
    finally:
        shim.fake.status_for = answer  # type: ignore[method-assign]
        release.set()
    interrupted = kube.get(f"{TENANTS}/web")
    assert interrupted is not None and (interrupted.get("status") or {}).get("phase") != "Running"

    with operator_process(kubeconfig, shim.fake.socket, log):
        running = wait_for(
            lambda: status_where(kube, "web", phase="Running", observedGeneration=1),
            what="web Running after the restart",
        )
        assert running["status"]["appliedRevision"] == f"main@sha1:{SHA_A}"
        assert shim.fake.requests.count(("PUT", "web")) >= 2
