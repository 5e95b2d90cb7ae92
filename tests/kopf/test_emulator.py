"""The emulated API server itself: the API server rules kopf and kubectl depend on."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, cast

import kubernetes
import pytest

from bitbuilder.operator.crd import tenant_crd
from tests.helpers.kube_emulator import Emulator, EmulatorThread
from tests.helpers.kube_http import TENANTS, Kube
from tests.kopf.conftest import KUBECTL, Kubectl


def tenant(name: str = "web", **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "bitbuilder.io/v1alpha1",
        "kind": "Tenant",
        "metadata": {"name": name, **meta},
        "spec": {"image": {"name": "base"}},
    }


def test_create_stamps_metadata_and_answers_201(kube: Kube) -> None:
    code, created = kube.request("POST", TENANTS, tenant())
    assert code == 201
    meta = created["metadata"]
    assert meta["uid"] and meta["creationTimestamp"].endswith("Z")
    assert meta["generation"] == 1 and int(meta["resourceVersion"]) > 0
    assert kube.request("POST", TENANTS, tenant())[0] == 409


def test_generate_name_gives_distinct_objects(kube: Kube) -> None:
    body = {"metadata": {"generateName": "ev-", "namespace": "default"}, "reason": "X"}
    first = kube.ok("POST", "/api/v1/namespaces/default/events", body)
    second = kube.ok("POST", "/api/v1/namespaces/default/events", body)
    assert first["metadata"]["name"].startswith("ev-")
    assert first["metadata"]["name"] != second["metadata"]["name"]


def test_official_client_decodes_the_created_object(api: EmulatorThread) -> None:
    config = kubernetes.client.Configuration(host=api.url)
    with kubernetes.client.ApiClient(config) as client:
        custom = kubernetes.client.CustomObjectsApi(client)
        created = cast(
            dict[str, Any],
            custom.create_cluster_custom_object("bitbuilder.io", "v1alpha1", "tenants", tenant()),
        )
        assert created["metadata"]["name"] == "web"
        listed = cast(
            dict[str, Any],
            custom.list_cluster_custom_object("bitbuilder.io", "v1alpha1", "tenants"),
        )
        assert [t["metadata"]["name"] for t in listed["items"]] == ["web"]


def test_generation_follows_spec_and_status_is_a_subresource(kube: Kube) -> None:
    kube.ok("POST", TENANTS, tenant())
    path = f"{TENANTS}/web"
    labelled = kube.merge(
        path, {"metadata": {"labels": {"a": "b"}}, "status": {"phase": "Running"}}
    )
    assert labelled["metadata"]["generation"] == 1
    assert "status" not in labelled, "status written through the main resource must be ignored"
    status = kube.merge(
        f"{path}/status", {"status": {"phase": "Running"}, "spec": {"suspend": True}}
    )
    assert status["status"]["phase"] == "Running"
    assert status["metadata"]["generation"] == 1 and status["spec"].get("suspend") is not True
    changed = kube.merge(path, {"spec": {"suspend": True}})
    assert changed["metadata"]["generation"] == 2
    assert changed["status"]["phase"] == "Running"
    assert int(changed["metadata"]["resourceVersion"]) > int(status["metadata"]["resourceVersion"])


def test_stale_resource_version_conflicts(kube: Kube) -> None:
    created = kube.ok("POST", TENANTS, tenant())
    kube.merge(f"{TENANTS}/web", {"spec": {"suspend": True}})
    stale = created["metadata"]["resourceVersion"]
    assert kube.request("PUT", f"{TENANTS}/web", created)[0] == 409
    code, _ = kube.request(
        "PATCH",
        f"{TENANTS}/web",
        {"metadata": {"resourceVersion": stale}, "spec": {"suspend": False}},
        content_type="application/merge-patch+json",
    )
    assert code == 409
    ops = [{"op": "test", "path": "/metadata/resourceVersion", "value": stale}]
    code, _ = kube.request(
        "PATCH", f"{TENANTS}/web", ops, content_type="application/json-patch+json"
    )
    assert code == 422, "kopf relies on 422 for a failed JSON-patch test"
    code, _ = kube.request(
        "PATCH", f"{TENANTS}/web", {}, content_type="application/apply-patch+yaml"
    )
    assert code == 415


def test_put_replaces_the_whole_object(kube: Kube) -> None:
    created = kube.ok("POST", TENANTS, tenant(labels={"keep": "no"}))
    created["metadata"]["labels"] = {"new": "yes"}
    created["spec"]["suspend"] = True
    replaced = kube.ok("PUT", f"{TENANTS}/web", created)
    assert replaced["metadata"]["labels"] == {"new": "yes"}
    assert replaced["metadata"]["generation"] == 2


def test_finalizers_hold_deletion_until_released(kube: Kube) -> None:
    kube.ok("POST", TENANTS, tenant(finalizers=["bitbuilder.io/machine"]))
    deleting = kube.ok("DELETE", f"{TENANTS}/web")
    assert deleting["metadata"]["deletionTimestamp"]
    assert kube.get(f"{TENANTS}/web") is not None
    kube.merge(f"{TENANTS}/web", {"metadata": {"finalizers": None}})
    assert kube.get(f"{TENANTS}/web") is None


def test_validation_against_the_crd_schema(kube: Kube) -> None:
    bad = tenant()
    bad["spec"]["runtime"] = "docker"
    code, answer = kube.request("POST", TENANTS, bad)
    assert code == 422 and "spec.runtime" in answer["message"]
    no_digest = tenant()
    no_digest["spec"]["image"]["url"] = "https://images.example/base.tar"
    code, answer = kube.request("POST", TENANTS, no_digest)
    assert code == 422 and "sha256" in answer["message"], "the CRD's CEL rules are enforced"
    unknown = tenant()
    unknown["spec"]["colour"] = "blue"
    assert kube.request("POST", f"{TENANTS}?fieldValidation=Strict", unknown)[0] == 400
    created = kube.ok("POST", TENANTS, unknown)
    assert "colour" not in created["spec"], "unknown fields are pruned"
    assert created["spec"]["runtime"] == "nspawn", "schema defaults are applied"
    url_only = {"spec": {"image": {"url": "https://images.example/base.tar"}}}
    code, answer = kube.request(
        "PATCH", f"{TENANTS}/web", url_only, content_type="application/merge-patch+json"
    )
    assert code == 422 and "sha256" in answer["message"], "CEL rules hold on updates too"
    code, answer = kube.request(
        "PATCH",
        f"{TENANTS}/web/status",
        {"status": {"phase": "Dancing"}},
        content_type="application/merge-patch+json",
    )
    assert code == 422 and "status.phase" in answer["message"]


def test_lists_have_kind_resource_version_and_selectors(kube: Kube) -> None:
    kube.ok("POST", TENANTS, tenant("a", labels={"team": "x"}))
    kube.ok("POST", TENANTS, tenant("b", labels={"team": "y"}))
    listed = kube.ok("GET", TENANTS)
    assert listed["kind"] == "TenantList" and int(listed["metadata"]["resourceVersion"]) >= 2
    assert [
        t["metadata"]["name"] for t in kube.ok("GET", f"{TENANTS}?labelSelector=team%3Dy")["items"]
    ] == ["b"]
    names = kube.ok("GET", f"{TENANTS}?labelSelector=team%20in%20(x,y),team!%3Dx")["items"]
    assert [t["metadata"]["name"] for t in names] == ["b"]
    by_field = kube.ok("GET", f"{TENANTS}?fieldSelector=metadata.name%3Da")["items"]
    assert [t["metadata"]["name"] for t in by_field] == ["a"]


def test_watch_replays_from_a_resource_version_and_times_out(kube: Kube) -> None:
    first = kube.ok("POST", TENANTS, tenant("a"))
    kube.ok("POST", TENANTS, tenant("b"))
    kube.merge(f"{TENANTS}/a", {"spec": {"suspend": True}})
    kube.ok("POST", "/api/v1/namespaces/default/events", {"metadata": {"name": "e"}})
    since = first["metadata"]["resourceVersion"]
    events = list(kube.watch(TENANTS, resourceVersion=since, timeoutSeconds="1"))
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "b"),
        ("MODIFIED", "a"),
    ]
    initial = list(kube.watch(TENANTS, timeoutSeconds="1"))
    assert sorted(e["object"]["metadata"]["name"] for e in initial) == ["a", "b"]


def test_idle_watches_get_bookmarks() -> None:
    with EmulatorThread(Emulator([tenant_crd()], bookmark_interval=0.2)) as api:
        kube = Kube(api.url)
        created = kube.ok("POST", TENANTS, tenant())
        since = created["metadata"]["resourceVersion"]
        events = list(
            kube.watch(
                TENANTS, resourceVersion=since, timeoutSeconds="1", allowWatchBookmarks="true"
            )
        )
        assert events and {e["type"] for e in events} == {"BOOKMARK"}
        assert events[-1]["object"]["metadata"]["resourceVersion"] == since


def test_a_bad_selector_is_a_bad_request(kube: Kube) -> None:
    assert kube.request("GET", f"{TENANTS}?labelSelector=a%20in%20b")[0] == 400


def test_watch_from_a_forgotten_version_is_gone() -> None:
    with EmulatorThread(Emulator([tenant_crd()], ring_size=2)) as api:
        kube = Kube(api.url)
        for name in "abcd":  # the ring keeps the last two: from 1 on, event 2 is lost
            kube.ok("POST", TENANTS, tenant(name))
        (event,) = kube.watch(TENANTS, resourceVersion="1", timeoutSeconds="5")
        assert event["type"] == "ERROR" and event["object"]["code"] == 410


def test_discovery_serves_tenants_and_core_resources(kube: Kube) -> None:
    group = kube.ok("GET", "/apis/bitbuilder.io/v1alpha1")
    names = {r["name"]: r for r in group["resources"]}
    assert names["tenants"]["kind"] == "Tenant" and names["tenants"]["namespaced"] is False
    assert "tn" in names["tenants"]["shortNames"] and "tenants/status" in names
    core = {r["name"] for r in kube.ok("GET", "/api/v1")["resources"]}
    assert {"namespaces", "events", "secrets"} <= core
    assert kube.ok("GET", "/api/v1/namespaces")["kind"] == "NamespaceList"


def test_table_rendering_uses_the_printer_columns(kube: Kube) -> None:
    kube.ok("POST", TENANTS, tenant())
    ready = {
        "type": "Ready",
        "status": "True",
        "reason": "Ok",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }
    kube.merge(f"{TENANTS}/web/status", {"status": {"phase": "Running", "conditions": [ready]}})
    rendered = kube.ok("GET", TENANTS, accept="application/json;as=Table;v=v1;g=meta.k8s.io")
    columns = [c["name"] for c in rendered["columnDefinitions"]]
    assert columns[:3] == ["Name", "Runtime", "Phase"] and "Ready" in columns
    row = dict(zip(columns, rendered["rows"][0]["cells"], strict=True))
    assert row["Phase"] == "Running" and row["Ready"] == "True" and row["Runtime"] == "nspawn"


def test_kubectl_apply_get_explain_delete(kubectl: Kubectl, tmp_path: Path) -> None:
    manifest = tmp_path / "tenant.yaml"
    manifest.write_text(
        "apiVersion: bitbuilder.io/v1alpha1\nkind: Tenant\nmetadata: {name: web}\n"
        "spec: {image: {name: base}, colour: blue}\n"
    )
    # kubectl finds fieldValidation in the published OpenAPI and leaves validation to the server
    assert 'unknown field "spec.colour"' in kubectl("apply", "-f", str(manifest), ok=False)
    manifest.write_text(manifest.read_text().replace(", colour: blue", ""))
    kubectl("apply", "-f", str(manifest))
    header, row = kubectl("get", "tenants").splitlines()
    assert header.split() == ["NAME", "RUNTIME", "PHASE", "REVISION", "NODE", "READY", "AGE"]
    assert row.split()[:2] == ["web", "nspawn"]
    assert "web" in kubectl("get", "tn", "-o", "name")
    assert "How often to check the remote" in kubectl("explain", "tenants.spec.source")
    kubectl("delete", "tenant", "web")
    assert kubectl("get", "tenants", "-o", "name") == ""


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
def test_kubectl_get_watch_prints_each_change(
    api: EmulatorThread, kube: Kube, tmp_path: Path
) -> None:
    assert KUBECTL is not None
    kube.ok("POST", TENANTS, tenant())
    env = {
        **os.environ,
        "KUBECONFIG": str(api.write_kubeconfig(tmp_path / "kc")),
        "HOME": str(tmp_path),
    }
    argv = [KUBECTL, "get", "tenants", "-w", "--request-timeout=5s"]
    with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True) as watch:
        assert watch.stdout is not None
        assert watch.stdout.readline().split()[:3] == ["NAME", "RUNTIME", "PHASE"]
        assert watch.stdout.readline().split()[:2] == ["web", "nspawn"]
        kube.merge(f"{TENANTS}/web/status", {"status": {"phase": "Running"}})
        assert watch.stdout.readline().split()[:3] == ["web", "nspawn", "Running"]
        watch.terminate()


def test_watch_resource_versions_are_checked(kube: Kube) -> None:
    assert kube.request("GET", f"{TENANTS}?watch=true&resourceVersion=abc")[0] == 400
    created = kube.ok("POST", TENANTS, tenant())
    ahead = int(created["metadata"]["resourceVersion"]) + 5
    assert list(kube.watch(TENANTS, resourceVersion=str(ahead), timeoutSeconds="1")) == []


def test_bodies_that_are_not_objects_are_bad_requests(kube: Kube) -> None:
    assert kube.request("POST", TENANTS, ["not", "an", "object"])[0] == 400


def test_the_request_log_is_bounded() -> None:
    with EmulatorThread(Emulator([tenant_crd()], log_size=10)) as api:
        kube = Kube(api.url)
        for _ in range(30):
            kube.ok("GET", TENANTS)
        log = api.emulator._requests
        assert len(log) == 10 and all(str(r.url).endswith(TENANTS) for r in log)


def test_a_posted_crd_is_served(kube: Kube) -> None:
    schema = {
        "type": "object",
        "properties": {"spec": {"type": "object", "properties": {"size": {"type": "integer"}}}},
    }
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com",
            "scope": "Namespaced",
            "names": {"plural": "widgets", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }
    created = kube.ok("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
    assert {c["type"] for c in created["status"]["conditions"]} >= {"Established"}
    widgets = "/apis/example.com/v1/namespaces/default/widgets"
    widget: dict[str, Any] = {"metadata": {"name": "w"}, "spec": {"size": "big"}}
    assert kube.request("POST", widgets, widget)[0] == 422
    widget["spec"]["size"] = 3
    assert kube.ok("POST", widgets, widget)["metadata"]["generation"] == 1


def test_pods_bind_once_go_with_their_owner_and_wait_for_their_kubelet(kube: Kube) -> None:
    """What placement relies on: binding, uid preconditions, ownerReference GC, and graceful
    deletion (a pod on a NotReady node stays Terminating until the node is Ready again)."""
    pods = "/api/v1/namespaces/default/pods"
    owner = kube.ok("POST", TENANTS, tenant())
    ref = {"apiVersion": "bitbuilder.io/v1alpha1", "kind": "Tenant", "name": "web",
           "uid": owner["metadata"]["uid"]}  # fmt: skip
    pod = {"metadata": {"name": "p", "ownerReferences": [ref]}, "spec": {"containers": []}}
    created = kube.ok("POST", pods, pod)
    binding = {"target": {"kind": "Node", "name": "node1"}}
    assert kube.request("POST", f"{pods}/p/binding", binding)[0] == 201
    assert kube.ok("GET", f"{pods}/p")["spec"]["nodeName"] == "node1"
    code, answer = kube.request("POST", f"{pods}/p/binding", binding)
    assert code == 409 and "already assigned" in answer["message"]
    stale = {"preconditions": {"uid": "not-its-uid"}}
    assert kube.request("DELETE", f"{pods}/p", stale)[0] == 409

    not_ready = {"type": "Ready", "status": "Unknown"}
    kube.merge("/api/v1/nodes/node1", {"status": {"conditions": [not_ready]}})
    assert kube.ok("DELETE", f"{pods}/p")["metadata"]["deletionTimestamp"]
    assert kube.get(f"{pods}/p") is not None, "Terminating while its kubelet is away"
    kube.merge("/api/v1/nodes/node1", {"status": {"conditions": [{**not_ready, "status": "True"}]}})
    assert kube.get(f"{pods}/p") is None

    kube.ok("POST", pods, pod)
    kube.ok("DELETE", f"{TENANTS}/web")
    assert kube.get(f"{pods}/p") is None, "collected with its owner"
    assert created["metadata"]["uid"]
