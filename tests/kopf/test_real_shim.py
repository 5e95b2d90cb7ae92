"""The kopf operator with the real host shim and real nspawn machines, via the emulated API."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.gated_proxy import GatedProxy
from tests.helpers.kube_emulator import EmulatorThread
from tests.helpers.kube_http import TENANTS, Kube
from tests.helpers.wait import wait_for
from tests.kopf.support import (
    condition,
    operator_process,
    operator_thread,
    phases_since,
    request_sync,
    run_e2e,
    stalled_tenant,
    status_where,
)
from tests.standalone.conftest import REAL_HOST, Host, motd, tenant_manifest

pytestmark = [*REAL_HOST, pytest.mark.slow]


def test_apply_update_break_and_delete_a_real_machine(
    api: EmulatorThread, kube: Kube, host: Host
) -> None:
    repo = host.tenant_repo("web", "v1")
    first = repo.head()
    with operator_thread(api.url, host.socket):
        created = kube.ok("POST", TENANTS, tenant_manifest("web", host.url("web"), interval="1h"))
        running = wait_for(
            lambda: status_where(kube, "web", phase="Running", observedGeneration=1),
            timeout=120,
            what="web Running",
        )
        assert running["status"]["appliedRevision"] == f"main@sha1:{first}"
        for kind in ("Ready", "SourceReady", "MachineReady"):
            assert condition(running, kind)["status"] == "True", kind
        assert running["status"]["machine"]["startedAt"]
        assert host.motd("web") == "v1"
        assert phases_since(kube, "web", created["metadata"]["resourceVersion"])[-1] == "Running"

        # A commit in the tenant repo: Updating, then Running at the new revision.
        second = repo.commit(motd("v2"), "v2")
        before = kube.ok("GET", f"{TENANTS}/web")["metadata"]["resourceVersion"]
        request_sync(kube, "web", "1")
        wait_for(
            lambda: status_where(
                kube, "web", phase="Running", appliedRevision=f"main@sha1:{second}"
            ),
            timeout=120,
            what="web at v2",
        )
        assert host.motd("web") == "v2"
        assert "Updating" in phases_since(kube, "web", before)

        # A broken commit: Stalled naming the file; v2 keeps running.
        repo.commit({"machine.yaml": "hostname: [unclosed\n"}, "broken")
        request_sync(kube, "web", "2")
        stalled = wait_for(
            lambda: stalled_tenant(kube, "web"),
            timeout=60,
            what="web Stalled",
        )
        assert "machine.yaml" in condition(stalled, "Stalled")["message"]
        assert stalled["status"]["appliedRevision"] == f"main@sha1:{second}"
        assert host.motd("web") == "v2"

        # Delete: the Tenant goes only once the machine is gone.
        kube.ok("DELETE", f"{TENANTS}/web")
        wait_for(lambda: kube.get(f"{TENANTS}/web") is None, timeout=60, what="web deleted")
        assert host.machine("web") is None


def test_the_e2e_suite_sees_a_tenant_ready(api: EmulatorThread, host: Host, tmp_path: Path) -> None:
    host.tenant_repo("e2e", "e2e")
    with operator_thread(api.url, host.socket):
        out = run_e2e(
            api, tmp_path, BITBUILDER_E2E_REPO=host.url("e2e"), BITBUILDER_E2E_IMAGE="busybox"
        )
    assert "5 passed, 1 skipped" in out, out  # placement across nodes needs two


def test_operator_killed_mid_reconcile_converges_on_the_real_shim(
    api: EmulatorThread, kube: Kube, host: Host, tmp_path: Path
) -> None:
    """The remote holds the shim's fetch (a gated proxy in front of git daemon) while the
    operator process is killed; the restarted operator brings the machine up."""
    first = host.tenant_repo("web", "v1").head()
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    log = tmp_path / "operator.log"
    with GatedProxy(host.git.port) as remote:
        url = host.url("web").replace(f":{host.git.port}/", f":{remote.port}/")
        with operator_process(kubeconfig, host.socket, log) as operator:
            kube.ok("POST", TENANTS, tenant_manifest("web", url, interval="1h"))
            assert remote.held.wait(60), "the shim never reached the remote"
            operator.kill()
            operator.wait()
        remote.gate.set()
        with operator_process(kubeconfig, host.socket, log):
            running = wait_for(
                lambda: status_where(kube, "web", phase="Running", observedGeneration=1),
                timeout=120,
                what="web Running after the restart",
            )
    assert running["status"]["appliedRevision"] == f"main@sha1:{first}"
    assert host.motd("web") == "v1"
