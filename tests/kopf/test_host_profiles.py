"""HostProfiles through kopf: the emulated API, the real handlers, the in-memory shim."""

from __future__ import annotations

from typing import Any

from tests.helpers.kube_emulator import EmulatorThread
from tests.helpers.kube_http import Kube
from tests.helpers.wait import wait_for
from tests.kopf.conftest import Kubectl
from tests.kopf.support import NODE, SHA_A, SHA_B, FakeShimServer, condition, operator_thread

PROFILES = "/apis/bitbuilder.io/v1alpha1/hostprofiles"


def host_profile(name: str = "base", **selector: str) -> dict[str, Any]:
    return {
        "apiVersion": "bitbuilder.io/v1alpha1",
        "kind": "HostProfile",
        "metadata": {"name": name},
        "spec": {
            "source": {"url": "https://git.example/host.git", "ref": {"branch": "main"}},
            "nodeSelector": selector,
        },
    }


def profile_where(kube: Kube, name: str, **wanted: Any) -> dict[str, Any] | None:
    obj = kube.get(f"{PROFILES}/{name}")
    status = (obj or {}).get("status") or {}
    return obj if all(status.get(k) == v for k, v in wanted.items()) else None


def test_a_profile_is_merged_reported_refreshed_and_unmerged_on_delete(
    api: EmulatorThread, kube: Kube, shim: FakeShimServer, kubectl: Kubectl
) -> None:
    shim.fake.heads["base"] = SHA_A
    with operator_thread(api.url, shim.fake.socket):
        kube.ok("POST", PROFILES, host_profile())
        kube.ok("POST", PROFILES, host_profile("elsewhere", role="storage"))
        applied = wait_for(
            lambda: profile_where(kube, "base", phase="Applied", appliedRevision=SHA_A),
            what="base Applied",
        )
        assert applied["status"]["node"] == NODE
        assert condition(applied, "Ready")["status"] == "True"
        row = kubectl("get", "hostprofiles", "base", "--no-headers").split()
        assert row[:5] == ["base", "Applied", SHA_A[:7], NODE, "True"]
        assert "elsewhere" not in shim.fake.host_specs  # selects no label of this node

        # A spec change syncs at once: the new commit is merged, the old one kept.
        shim.fake.heads["base"] = SHA_B
        kube.merge(f"{PROFILES}/base", {"spec": {"source": {"path": "host"}}})
        wait_for(
            lambda: profile_where(kube, "base", appliedRevision=SHA_B, previousRevision=SHA_A),
            what="revision B merged",
        )
        assert shim.fake.host_specs["base"].source.path == "host"

        kube.ok("DELETE", f"{PROFILES}/base")
        wait_for(lambda: "base" not in shim.fake.host_layers, what="base unmerged")
        assert ("DELETE-HOST", "base") in shim.fake.requests
