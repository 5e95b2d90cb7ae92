"""GET /openapi.json: a complete OpenAPI 3.1 document that agrees with what the server does."""

from __future__ import annotations

from typing import Any

import jsonschema

from tests.shim.conftest import FakeShim, machine_spec

ROUTES = {
    ("get", "/healthz"), ("get", "/openapi.json"), ("get", "/v1/machines"),
    ("get", "/v1/machines/{name}"), ("put", "/v1/machines/{name}"),
    ("delete", "/v1/machines/{name}"), ("post", "/v1/machines/{name}/restart"),
    ("get", "/v1/images"), ("get", "/v1/images/{name}"), ("put", "/v1/images/{name}"),
    ("get", "/v1/host/layers"), ("get", "/v1/host/layers/{name}"),
    ("put", "/v1/host/layers/{name}"), ("delete", "/v1/host/layers/{name}"),
    ("delete", "/v1/images/{name}"),
}  # fmt: skip


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _schema(doc: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """A standalone JSON Schema for one $ref (components inlined as $defs)."""
    name = ref["$ref"].rsplit("/", 1)[1]
    schemas = doc["components"]["schemas"]
    return {**schemas[name], "components": {"schemas": schemas}}


def test_document_lists_every_route_and_resolves(fake_shim: FakeShim) -> None:
    reply = fake_shim.client.request("GET", "/openapi.json")
    assert reply.status == 200
    doc = reply.body
    assert doc["openapi"] == "3.1.0"
    listed = {(m, p) for p, ops in doc["paths"].items() for m in ops if m != "parameters"}
    assert listed == ROUTES
    schemas = doc["components"]["schemas"]
    for ref in _refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    put = doc["paths"]["/v1/machines/{name}"]["put"]
    assert {"200", "400", "403", "413", "415", "422"} <= set(put["responses"])


def test_schemas_agree_with_the_server(fake_shim: FakeShim) -> None:
    doc = fake_shim.client.request("GET", "/openapi.json").body
    put = doc["paths"]["/v1/machines/{name}"]["put"]
    body_schema = _schema(doc, put["requestBody"]["content"]["application/json"]["schema"])
    reply_schema = _schema(doc, put["responses"]["200"]["content"]["application/json"]["schema"])
    error_schema = _schema(doc, put["responses"]["422"]["content"]["application/json"]["schema"])
    validator = jsonschema.Draft202012Validator

    spec = machine_spec()
    validator(body_schema).validate(spec)
    reply = fake_shim.client.put(spec)
    assert reply.status == 200
    validator(reply_schema).validate(reply.body)

    unknown = {**spec, "privileged": True}
    assert not validator(body_schema).is_valid(unknown)  # the document says: no extra fields
    refused = fake_shim.client.put(unknown)
    assert refused.status == 422
    validator(error_schema).validate(refused.body)
