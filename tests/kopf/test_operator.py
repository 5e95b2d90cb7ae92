"""The kopf operator end to end against the emulated API and the in-memory shim."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

from bitbuilder.hostshim.api import ErrorInfo
from bitbuilder.operator.api import FINALIZER, OPERATOR_NAMESPACE
from tests.helpers.kube_emulator import EmulatorThread
from tests.helpers.kube_http import TENANTS, Kube
from tests.helpers.wait import wait_for
from tests.kopf.conftest import Kubectl
from tests.kopf.support import (
    NODE,
    SHA_A,
    SHA_B,
    FakeShimServer,
    condition,
    event_reasons,
    operator_thread,
    request_sync,
    stalled_tenant,
    status_where,
    tenant,
)


def test_apply_runs_then_follows_spec_commits_and_problems(
    api: EmulatorThread, kube: Kube, shim: FakeShimServer, kubectl: Kubectl
) -> None:
    shim.fake.heads["web"] = SHA_A
    with operator_thread(api.url, shim.fake.socket):
        kube.ok("POST", TENANTS, tenant())
        running = wait_for(
            lambda: status_where(kube, "web", phase="Running", observedGeneration=1),
            what="web Running",
        )
        assert condition(running, "Ready")["status"] == "True"
        assert condition(running, "Stalled").get("status") != "True"
        assert running["status"]["appliedRevision"] == f"main@sha1:{SHA_A}"
        assert running["metadata"]["finalizers"] == [FINALIZER]
        assert not any(k.startswith("kopf") for k in running["status"]), "kopf keys in status"
        row = kubectl("get", "tenants", "--no-headers").split()
        assert row[:6] == ["web", "nspawn", "Running", SHA_A[:7], NODE, "True"]

        # A spec change: a new generation, observed once reconciled.
        kube.merge(f"{TENANTS}/web", {"spec": {"resources": {"memory": "64Mi"}}})
        wait_for(lambda: status_where(kube, "web", observedGeneration=2), what="generation 2")
        assert shim.fake.specs["web"].resources.memory_bytes == 64 * 2**20

        # Suspend stops the machine (its data stays); clearing it resumes.
        kube.merge(f"{TENANTS}/web", {"spec": {"suspend": True}})
        wait_for(lambda: status_where(kube, "web", phase="Suspended"), what="web Suspended")
        assert shim.fake.specs["web"].suspend
        kube.merge(f"{TENANTS}/web", {"spec": {"suspend": False}})
        wait_for(lambda: status_where(kube, "web", phase="Running"), what="web resumed")

        # A new commit, picked up at once through the annotation.
        shim.fake.heads["web"] = SHA_B
        request_sync(kube, "web", "1")
        wait_for(
            lambda: status_where(kube, "web", appliedRevision=f"main@sha1:{SHA_B}"),
            what="revision B applied",
        )

        # A broken commit: Stalled, naming the problem, the previous revision still applied.
        shim.fake.source_errors["web"] = ErrorInfo(
            reason="LayoutError",
            message="units/evil.service: not a unit file",
            at=datetime.now(UTC),
        )
        request_sync(kube, "web", "2")
        stalled = wait_for(
            lambda: stalled_tenant(kube, "web"),
            what="web Stalled",
        )
        assert "units/evil.service" in condition(stalled, "Stalled")["message"]
        assert stalled["status"]["appliedRevision"] == f"main@sha1:{SHA_B}"
        assert "RevisionApplied" in event_reasons(kube, "web")


def test_delete_releases_the_finalizer_only_after_the_machine_is_gone(
    api: EmulatorThread, kube: Kube, shim: FakeShimServer
) -> None:
    shim.fake.heads["web"] = SHA_A
    with operator_thread(api.url, shim.fake.socket):
        kube.ok("POST", TENANTS, tenant())
        wait_for(lambda: status_where(kube, "web", phase="Running"), what="web Running")
        shim.down()  # the shim is unreachable for now
        kube.ok("DELETE", f"{TENANTS}/web")
        wait_for(lambda: "ShimUnavailable" in event_reasons(kube, "web"), what="a warning")
        held = kube.get(f"{TENANTS}/web")
        assert held is not None and held["metadata"]["deletionTimestamp"]
        assert held["status"]["phase"] == "Terminating"
        assert "web" in shim.fake.machines
        shim.up()
        wait_for(lambda: kube.get(f"{TENANTS}/web") is None, timeout=30, what="web deleted")
        assert "web" not in shim.fake.machines and ("DELETE", "web") in shim.fake.requests


def test_the_source_is_polled_every_interval(
    api: EmulatorThread, kube: Kube, shim: FakeShimServer
) -> None:
    shim.fake.heads["web"] = SHA_A
    with operator_thread(api.url, shim.fake.socket):
        body = tenant()
        body["spec"]["source"]["interval"] = "1s"
        kube.ok("POST", TENANTS, body)
        wait_for(lambda: status_where(kube, "web", phase="Running"), what="web Running")
        shim.fake.heads["web"] = SHA_B  # no annotation, no spec change: only the timer notices
        wait_for(
            lambda: status_where(kube, "web", appliedRevision=f"main@sha1:{SHA_B}"),
            timeout=10,
            what="revision B applied by polling",
        )


def test_secret_refs_are_read_from_the_operator_namespace(
    api: EmulatorThread, kube: Kube, shim: FakeShimServer
) -> None:
    shim.fake.heads["web"] = SHA_A
    with operator_thread(api.url, shim.fake.socket):
        body = tenant()
        body["spec"]["source"]["secretRef"] = {"name": "git"}
        kube.ok("POST", TENANTS, body)
        stalled = wait_for(
            lambda: stalled_tenant(kube, "web"),
            what="web Stalled without its secret",
        )
        assert condition(stalled, "Stalled")["reason"] == "SecretNotFound"
        assert "git" in condition(stalled, "Stalled")["message"]
        assert ("PUT", "web") not in shim.fake.requests
        secret = {
            "metadata": {"name": "git"},
            "data": {"username": b64("bob"), "password": b64("s3cret")},
        }
        kube.ok("POST", f"/api/v1/namespaces/{OPERATOR_NAMESPACE}/secrets", secret)
        request_sync(kube, "web", "now")
        wait_for(lambda: status_where(kube, "web", phase="Running"), what="web Running")
        credentials = shim.fake.specs["web"].source
        assert credentials is not None and credentials.credentials is not None
        assert credentials.credentials.username == "bob"
        assert credentials.credentials.password is not None
        assert credentials.credentials.password.get_secret_value() == "s3cret"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_a_tenant_the_crd_takes_but_the_models_refuse_is_stalled_in_status(
    api: EmulatorThread, kube: Kube, shim: FakeShimServer
) -> None:
    """'1Mi' matches the CRD's quantity pattern, but is below the shim's memory minimum: the
    Tenant gets Stalled/InvalidSpec naming its own field (it used to get only an Event)."""
    shim.fake.heads["web"] = SHA_A
    with operator_thread(api.url, shim.fake.socket):
        kube.ok("POST", TENANTS, tenant(resources={"memory": "1Mi"}))
        stalled = wait_for(lambda: stalled_tenant(kube, "web"), what="web Stalled")
        cond = condition(stalled, "Stalled")
        assert cond["reason"] == "InvalidSpec"
        assert "resources.memory '1Mi' is out of range: give 16Mi to 1Pi" in cond["message"]
        assert condition(stalled, "Ready")["status"] == "False"
        assert stalled["status"]["observedGeneration"] == 1
        assert "web" not in shim.fake.specs  # nothing reached the host

        kube.merge(f"{TENANTS}/web", {"spec": {"resources": {"memory": "64Mi"}}})
        running = wait_for(
            lambda: status_where(kube, "web", phase="Running", observedGeneration=2),
            what="web Running once fixed",
        )
        assert condition(running, "Stalled").get("status") != "True"
