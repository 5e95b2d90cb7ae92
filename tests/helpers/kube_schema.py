"""What an API server does with a CustomResourceDefinition, for the emulated API.

From the CRD's own openAPIV3Schema: structural pruning of unknown fields, defaulting,
validation (jsonschema, after turning the Kubernetes-only keywords into plain JSON Schema) and
its x-kubernetes-validations CEL rules (tests/helpers/cel_rules.py);
from its additionalPrinterColumns: the server-side Table that `kubectl get` prints.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import jsonschema

from bitbuilder.operator.get import human_age
from tests.helpers.cel_rules import cel_violations

Obj = dict[str, Any]
TABLE_META = {"kind": "Table", "apiVersion": "meta.k8s.io/v1"}
_NAME_COLUMN = {"name": "Name", "type": "string", "format": "name", "priority": 0}
_AGE_COLUMN = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


@dataclass(frozen=True)
class ResourceType:
    """One served resource: what discovery shows and what the object rules need."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    status_subresource: bool = False
    schema: Obj | None = None  # openAPIV3Schema; None = accept anything
    printer_columns: tuple[Obj, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> str:
        return f"{self.group}/{self.version}/{self.plural}"

    @property
    def api_root(self) -> str:
        """`apis/<group>/<version>`, or `api/v1` for the core group."""
        return f"apis/{self.group}/{self.version}" if self.group else f"api/{self.version}"

    @property
    def openapi_name(self) -> str:
        """The schema's name in OpenAPI documents, e.g. io.bitbuilder.v1alpha1.Tenant."""
        group = ".".join(reversed(self.group.split("."))) if self.group else "io.k8s.api.core"
        return f"{group}.{self.version}.{self.kind}"

    @property
    def custom(self) -> bool:
        """Custom resources carry metadata.generation; the core types we serve do not."""
        return self.schema is not None

    @classmethod
    def from_crd(cls, crd: Obj) -> ResourceType:
        spec = crd["spec"]
        names = spec["names"]
        version = next(v for v in spec["versions"] if v.get("storage", v.get("served", True)))
        return cls(
            group=spec["group"],
            version=version["name"],
            plural=names["plural"],
            kind=names["kind"],
            namespaced=spec.get("scope", "Namespaced") == "Namespaced",
            singular=names.get("singular", names["kind"].lower()),
            short_names=tuple(names.get("shortNames", ())),
            categories=tuple(names.get("categories", ())),
            status_subresource="status" in version.get("subresources", {}),
            schema=version.get("schema", {}).get("openAPIV3Schema", {"type": "object"}),
            printer_columns=tuple(version.get("additionalPrinterColumns", ())),
        )


@dataclass
class Admission:
    """Outcome of pruning and validating one object."""

    pruned: list[str] = field(default_factory=list)  # paths of dropped unknown fields
    errors: list[str] = field(default_factory=list)


def admit(rtype: ResourceType, obj: Obj, before: Obj | None = None) -> Admission:
    """Prune unknown fields and apply defaults in place, then validate against the schema and
    the CEL rules. On an update (`before`), CEL rules run only on the top-level fields that
    changed, as the API server's validation ratcheting lets unchanged values pass."""
    result = Admission()
    if rtype.schema is None:
        return result
    properties = rtype.schema.get("properties", {})
    for key in list(obj):
        if key in ("apiVersion", "kind", "metadata"):
            continue
        if key in properties:
            obj[key] = _prune(obj[key], properties[key], key, result.pruned)
        elif not rtype.schema.get("x-kubernetes-preserve-unknown-fields"):
            result.pruned.append(key)
            del obj[key]
    checked = {k: v for k, v in obj.items() if k != "metadata"}
    for error in sorted(_validator(rtype.schema).iter_errors(checked), key=_error_path):
        path = ".".join(str(p) for p in error.absolute_path) or "<root>"
        value = json.dumps(error.instance, default=str)
        value = value if len(value) <= 80 else value[:77] + "..."
        result.errors.append(f"{path}: Invalid value: {value}: {error.message}")
    if result.errors:  # the server runs CEL rules only on schema-valid objects
        return result
    if before is None:
        result.errors += cel_violations(rtype.schema, obj)
        return result
    for key, value in obj.items():
        if key in properties and key != "metadata" and value != before.get(key):
            result.errors += cel_violations(properties[key], value, key)
    return result


_VALIDATORS: dict[int, jsonschema.Draft7Validator] = {}


def _validator(schema: Obj) -> jsonschema.Draft7Validator:
    """The schema as JSON Schema (once per schema): metadata left out, the API server checks
    only names there."""
    if id(schema) not in _VALIDATORS:
        top = _to_jsonschema(schema)
        top.get("properties", {}).pop("metadata", None)
        _VALIDATORS[id(schema)] = jsonschema.Draft7Validator(top)
    return _VALIDATORS[id(schema)]


def _error_path(error: jsonschema.ValidationError) -> list[str]:
    return [str(p) for p in error.absolute_path]


def _prune(value: Any, schema: Obj, path: str, pruned: list[str]) -> Any:
    """Structural pruning and defaulting, as the API server does before validation."""
    if isinstance(value, dict) and not schema.get("x-kubernetes-preserve-unknown-fields"):
        properties: Obj | None = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key in list(value):
            sub = (properties or {}).get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                value[key] = _prune(value[key], sub, f"{path}.{key}", pruned)
            elif extra is not True:
                pruned.append(f"{path}.{key}")
                del value[key]
        for key, sub in (properties or {}).items():
            if key not in value and "default" in sub:
                value[key] = _prune(copy.deepcopy(sub["default"]), sub, f"{path}.{key}", pruned)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_prune(v, schema["items"], f"{path}[{i}]", pruned) for i, v in enumerate(value)]
    return value


def _to_jsonschema(schema: Any) -> Any:
    """OpenAPI v3 as Kubernetes speaks it -> JSON Schema draft 7."""
    if isinstance(schema, list):
        return [_to_jsonschema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _to_jsonschema(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    for key in ("properties", "patternProperties"):
        if key in schema:  # property *names* are not schemas: keep them, convert the values
            out[key] = {name: _to_jsonschema(s) for name, s in schema[key].items()}
    if schema.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if schema.get("nullable") and "type" in out:
        types = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = [*types, "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    out.pop("nullable", None)
    return out


def table(rtype: ResourceType, objects: list[Obj], resource_version: str) -> Obj:
    """A meta.k8s.io/v1 Table, with the CRD's printer columns (or Name and Age)."""
    columns = list(rtype.printer_columns) or [_AGE_COLUMN]
    definitions = [_NAME_COLUMN] + [
        {
            "name": c["name"],
            "type": c.get("type", "string"),
            "format": c.get("format", ""),
            "description": c.get("description", ""),
            "priority": c.get("priority", 0),
        }
        for c in columns
    ]
    rows = [
        {
            "cells": [o["metadata"]["name"]]
            + [_cell(c, jsonpath(o, c["jsonPath"])) for c in columns],
            "object": {
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": o["metadata"],
            },
        }
        for o in objects
    ]
    return {
        **TABLE_META,
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": definitions,
        "rows": rows,
    }


def _cell(column: Obj, value: Any) -> Any:
    if value is None:
        return None
    if column.get("type") == "date":
        try:
            then = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return str(value)
        return human_age((datetime.now(UTC) - then).total_seconds())
    if column.get("type") in ("string", None) and not isinstance(value, str):
        return json.dumps(value)
    return value


_STEP = re.compile(
    r"\.(?P<field>[\w-]+)|\[(?P<index>\d+)\]|\[\?\(@\.(?P<key>[\w-]+)==[\"'](?P<value>[^\"']*)[\"']\)\]"
)


def jsonpath(obj: Any, path: str) -> Any:
    """The JSONPath subset printer columns use: `.a.b`, `[0]`, `[?(@.type=="Ready")]`."""
    values = [obj]
    position = 0
    path = path.strip().removeprefix("{").removesuffix("}").removeprefix("$")
    while position < len(path):
        match = _STEP.match(path, position)
        if match is None:
            raise ValueError(f"unsupported JSONPath {path!r} at {position}")
        position = match.end()
        values = list(_step(values, match))
    return values[0] if values else None


def _step(values: list[Any], match: re.Match[str]) -> Any:
    for value in values:
        if match["field"] is not None and isinstance(value, dict) and match["field"] in value:
            yield value[match["field"]]
        elif match["index"] is not None and isinstance(value, list):
            if int(match["index"]) < len(value):
                yield value[int(match["index"])]
        elif match["key"] is not None and isinstance(value, list):
            yield from (
                v
                for v in value
                if isinstance(v, dict) and str(v.get(match["key"])) == match["value"]
            )


def openapi_index(types: list[ResourceType]) -> Obj:
    """/openapi/v3: one document per group-version."""
    paths = {f"{t.api_root}": {"serverRelativeURL": f"/openapi/v3/{t.api_root}"} for t in types}
    return {"paths": paths}


def openapi_document(types: list[ResourceType]) -> Obj:
    """/openapi/v3/<group-version>: the schemas kubectl explains and the PATCH operations whose
    `fieldValidation` parameter tells kubectl to leave validation to the server."""
    schemas: Obj = {}
    paths: Obj = {}
    for t in types:
        gvk = [{"group": t.group, "version": t.version, "kind": t.kind}]
        schema = copy.deepcopy(t.schema) if t.schema is not None else {"type": "object"}
        schemas[t.openapi_name] = {**schema, "x-kubernetes-group-version-kind": gvk}
        scope = "/namespaces/{namespace}" if t.namespaced else ""
        patch = {
            "x-kubernetes-action": "patch",
            "x-kubernetes-group-version-kind": gvk[0],
            "parameters": [
                {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}
            ],
            "responses": {"200": {"description": "OK"}},
        }
        paths[f"/{t.api_root}{scope}/{t.plural}/{{name}}"] = {"patch": patch}
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (emulated)", "version": "v1.26"},
        "paths": paths,
        "components": {"schemas": schemas},
    }
