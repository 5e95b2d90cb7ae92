"""The CRD: generated from the models, committed, structural, described, with working rules."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import yaml

from bitbuilder.operator import cli
from bitbuilder.operator.crd import render_crd
from tests.foundation.conftest import CRD_FILE, EXAMPLES, HEALTH_DIR, load_documents
from tests.helpers.cel_rules import cel_violations, compile_rule
from tests.helpers.kube_schema import ResourceType, admit, jsonpath

Obj = dict[str, Any]


def walk(node: Obj, path: str = "") -> Iterator[tuple[str, Obj]]:
    """Every schema node with its path (properties, list items, map values)."""
    yield path or "<root>", node
    for name, sub in node.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def properties(node: Obj, path: str = "") -> Iterator[tuple[str, Obj]]:
    for where, sub in walk(node, path):
        for name, prop in sub.get("properties", {}).items():
            yield f"{where.removeprefix('<root>')}.{name}", prop


def test_committed_crd_is_what_the_models_render() -> None:
    assert CRD_FILE.read_text() == render_crd(), (
        "crds/tenants.bitbuilder.io.yaml is stale: run `bitbuilder crd > crds/tenants.bitbuilder.io.yaml`"
    )


def test_cli_prints_the_crd(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["crd"]) == 0
    assert capsys.readouterr().out == CRD_FILE.read_text()


def test_cli_without_a_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2
    assert "crd" in capsys.readouterr().err


def test_names_scope_and_version(crd: Obj) -> None:
    spec = crd["spec"]
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == "tenants.bitbuilder.io"
    assert (spec["group"], spec["scope"]) == ("bitbuilder.io", "Cluster")
    assert spec["names"] == {
        "kind": "Tenant",
        "listKind": "TenantList",
        "plural": "tenants",
        "singular": "tenant",
        "shortNames": ["tn"],
        "categories": ["bitbuilder"],
    }
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_schema_is_structural(schema: Obj) -> None:
    """What the API server refuses as non-structural or invalid, node by node."""
    problems = []
    for path, node in walk(schema):
        int_or_string = node.get("x-kubernetes-int-or-string") is True
        if "type" not in node and not int_or_string:
            problems.append(f"{path}: no type")
        if int_or_string and ("type" in node or node.get("anyOf") != _INT_OR_STRING):
            problems.append(f"{path}: int-or-string must be untyped with anyOf integer|string")
        if "anyOf" in node and not int_or_string:
            problems.append(f"{path}: anyOf outside an int-or-string")
        for key in ("$ref", "const", "title", "oneOf", "allOf", "not", "nullable", "$defs"):
            if key in node:
                problems.append(f"{path}: {key}")
        if "default" in node and node["default"] is None:
            problems.append(f"{path}: null default")
        if "additionalProperties" in node and (
            "properties" in node or not isinstance(node["additionalProperties"], dict)
        ):
            problems.append(f"{path}: additionalProperties must be a map's value schema only")
    assert problems == []


_INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]


def test_metadata_is_left_to_the_api_server(schema: Obj) -> None:
    assert schema["properties"]["metadata"] == {
        "type": "object",
        "description": "Standard object metadata.",
    }
    assert schema["required"] == ["spec"]


def test_every_property_has_a_description(schema: Obj) -> None:
    missing = [path for path, prop in properties(schema) if not prop.get("description")]
    assert missing == []
    assert schema.get("description")


def test_status_declares_its_fields_and_keeps_kopfs(schema: Obj) -> None:
    status = schema["properties"]["status"]
    assert "x-kubernetes-preserve-unknown-fields" not in status
    assert status["properties"]["kopf"]["x-kubernetes-preserve-unknown-fields"] is True
    preserving = [p for p, n in walk(schema) if n.get("x-kubernetes-preserve-unknown-fields")]
    assert preserving == [".status.kopf"]


def test_defaults_are_valid_for_their_own_schema(schema: Obj) -> None:
    """The API server rejects a CRD whose default does not validate (structural defaults)."""
    defaults = [(p, n) for p, n in walk(schema) if "default" in n]
    assert {p for p, _ in defaults} >= {".spec.runtime", ".spec.source.interval", ".spec.suspend"}
    for _, node in defaults:
        plain = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-")}
        jsonschema.validate(node["default"], plain)


def test_enums_are_string_enums(schema: Obj) -> None:
    spec = schema["properties"]["spec"]["properties"]
    assert spec["runtime"]["enum"] == ["nspawn", "vmspawn"]
    assert spec["runtime"]["type"] == "string"
    assert schema["properties"]["status"]["properties"]["phase"]["type"] == "string"


def test_quantities_are_int_or_string(schema: Obj) -> None:
    resources = schema["properties"]["spec"]["properties"]["resources"]["properties"]
    for name in ("cpu", "memory", "disk"):
        assert resources[name]["x-kubernetes-int-or-string"] is True
        assert "pattern" in resources[name]


def test_every_cel_rule_compiles(schema: Obj) -> None:
    rules = [r["rule"] for _, n in walk(schema) for r in n.get("x-kubernetes-validations", [])]
    assert len(rules) >= 3
    for rule in rules:
        compile_rule(rule)


def _tenant(**spec: Any) -> Obj:
    return {
        "apiVersion": "bitbuilder.io/v1alpha1",
        "kind": "Tenant",
        "metadata": {"name": "web"},
        "spec": {"image": {"name": "debian-12"}, **spec},
    }


def test_cel_rules_hold_for_a_good_tenant(schema: Obj) -> None:
    source = {"url": "https://git.example.com/web.git", "ref": {"branch": "main"}}
    assert cel_violations(schema, _tenant(source=source)) == []
    signed = {"name": "x", "url": "https://example.com/i.raw", "verify": "signature"}
    assert cel_violations(schema, {**_tenant(), "spec": {"image": signed}}) == []


@pytest.mark.parametrize(
    ("change", "where", "message"),
    [
        ({"metadata": {"name": "Web_1"}}, "<root>", "DNS-1123 label"),
        ({"metadata": {"name": "a" * 64}}, "<root>", "DNS-1123 label"),
        (
            {"spec": {"image": {"name": "x"}, "source": {"url": "u", "ref": {}}}},
            "spec.source.ref",
            "exactly one of branch, tag or commit",
        ),
        (
            {
                "spec": {
                    "image": {"name": "x"},
                    "source": {"url": "u", "ref": {"branch": "main", "tag": "v1"}},
                }
            },
            "spec.source.ref",
            "exactly one of branch, tag or commit",
        ),
        (
            {"spec": {"image": {"name": "x", "url": "https://example.com/i.tar"}}},
            "spec.image",
            "image.url needs image.sha256 or image.verify: signature",
        ),
        (
            {"spec": {"image": {"name": "x", "verify": "signature"}}},
            "spec.image",
            "image.verify needs image.url",
        ),
    ],
)
def test_cel_rules_refuse(schema: Obj, change: Obj, where: str, message: str) -> None:
    violations = cel_violations(schema, {**_tenant(), **change})
    assert len(violations) == 1, violations
    assert violations[0].startswith(f"{where}: ") and message in violations[0]


def test_printer_columns_read_a_live_tenant(crd: Obj) -> None:
    rtype = ResourceType.from_crd(crd)
    [healthy] = load_documents(HEALTH_DIR / "testdata" / "healthy.yaml")
    assert admit(rtype, healthy).errors == []  # applies spec.runtime's default
    cells = {c["name"]: jsonpath(healthy, c["jsonPath"]) for c in rtype.printer_columns}
    assert cells == {
        "Runtime": "nspawn",
        "Phase": "Running",
        "Revision": "3f1c2a9",
        "Node": "node-1",
        "Ready": "True",
        "Age": "2026-11-20T10:00:00Z",
    }
    assert [c["type"] for c in rtype.printer_columns][-1] == "date"


HOST_PROFILE_CRD_FILE = CRD_FILE.with_name("hostprofiles.bitbuilder.io.yaml")


def test_committed_host_profile_crd_is_what_the_models_render(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert HOST_PROFILE_CRD_FILE.read_text() == render_crd("HostProfile"), (
        "crds/hostprofiles.bitbuilder.io.yaml is stale: run "
        "`bitbuilder crd --kind HostProfile > crds/hostprofiles.bitbuilder.io.yaml`"
    )
    assert cli.main(["crd", "--kind", "HostProfile"]) == 0
    assert capsys.readouterr().out == HOST_PROFILE_CRD_FILE.read_text()


def test_host_profile_example_is_admitted_and_printed() -> None:
    crd = yaml.safe_load(HOST_PROFILE_CRD_FILE.read_text())
    rtype = ResourceType.from_crd(crd)
    assert (rtype.kind, rtype.plural, rtype.namespaced) == ("HostProfile", "hostprofiles", False)
    [profile] = load_documents(EXAMPLES / "hostprofiles" / "base.yaml")
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    admitted = admit(rtype, profile)
    assert (admitted.errors, admitted.pruned) == ([], [])
    assert cel_violations(schema, profile) == []
    profile["status"] = {"phase": "Applied", "shortRevision": "3f1c2a9", "node": "node-1"}
    cells = {c["name"]: jsonpath(profile, c["jsonPath"]) for c in rtype.printer_columns}
    assert (cells["Phase"], cells["Revision"], cells["Node"]) == ("Applied", "3f1c2a9", "node-1")
    bad = {**profile, "spec": {"source": {"url": "https://x.example/r.git", "ref": {}}}}
    assert cel_violations(schema, bad), "a ref with neither branch, tag nor commit is refused"
