"""Broken Tenants are refused by the models with an error naming the field, and by the CRD."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import ValidationError

from bitbuilder.operator.api import Tenant, TenantStatus, validation_message
from tests.helpers.cel_rules import cel_violations
from tests.helpers.kube_schema import ResourceType, admit

Obj = dict[str, Any]

GOOD: Obj = {
    "apiVersion": "bitbuilder.io/v1alpha1",
    "kind": "Tenant",
    "metadata": {"name": "web"},
    "spec": {
        "image": {"name": "debian-12"},
        "source": {"url": "https://git.example.com/web.git", "ref": {"branch": "main"}},
        "resources": {"memory": "512Mi"},
    },
}


def _broken(path: str, value: Any) -> Obj:
    """GOOD with the dotted `path` set to `value`."""
    obj = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node = obj
    for key in parents:
        node = node[key]
    node[last] = value
    return obj


BROKEN = {
    "bad name": (_broken("metadata.name", "Web_1"), "metadata.name"),
    "two ref kinds": (
        _broken("spec.source.ref", {"branch": "main", "tag": "v1"}),
        "spec.source.ref",
    ),
    "negative memory": (_broken("spec.resources.memory", "-512Mi"), "spec.resources.memory"),
    "unknown field": (_broken("spec.imagee", {"name": "x"}), "spec.imagee"),
}


def test_the_good_tenant_is_accepted() -> None:
    assert Tenant.from_object(GOOD).spec.resources.memory_bytes() == 512 * 2**20


@pytest.mark.parametrize("case", BROKEN)
def test_models_refuse_naming_the_field(case: str) -> None:
    obj, field = BROKEN[case]
    with pytest.raises(ValidationError) as error:
        Tenant.from_object(obj)
    locations = {".".join(str(p) for p in e["loc"]) for e in error.value.errors()}
    # A model-level check (exactly one ref kind) is reported at the model's own location.
    assert any(loc == field or loc.startswith(f"{field}.") for loc in locations), locations
    assert field.rsplit(".", 1)[-1] in str(error.value)


@pytest.mark.parametrize("case", BROKEN)
def test_crd_refuses_too(crd: Obj, schema: Obj, case: str) -> None:
    obj, field = BROKEN[case]
    result = admit(ResourceType.from_crd(crd), copy.deepcopy(obj))
    problems = result.errors + [f"{p}: pruned" for p in result.pruned]
    problems += cel_violations(schema, obj)
    assert any(field in problem for problem in problems), problems


@pytest.mark.parametrize(
    "url",
    [
        "https://ghp_secrettoken@git.example.com/web.git",
        "https://git.example.com/web.git?access_token=secret",
        "https://user:secret@git.example.com/web.git",
        "https://git.example.com/web.git#main",
    ],
)
def test_urls_that_would_leak_a_credential_are_refused(url: str) -> None:
    with pytest.raises(ValidationError) as error:
        Tenant.from_object(_broken("spec.source.url", url))
    message = validation_message(error.value)  # what status and logs show
    assert message.startswith("spec.source.url: "), message
    assert "secret" not in message.replace("credentials secret", ""), message


def test_ssh_urls_keep_their_user() -> None:
    for url in ("ssh://git@git.example.com/web.git", "git@git.example.com:web.git"):
        assert Tenant.from_object(_broken("spec.source.url", url)).spec.source is not None


@pytest.mark.parametrize(
    ("applied", "short"),
    [
        (None, None),
        ("main@sha1:3f1c2a9e0b7d4c6f8a1e5b2d9c0f7a4e6b8d1c3f", "3f1c2a9"),
        ("sha1:9d2e4f6a8b0c1d3e5f7a9b1c3d5e7f9a0b2c4d6e", "9d2e4f6"),
    ],
)
def test_short_revision_follows_the_applied_revision(
    applied: str | None, short: str | None
) -> None:
    status = TenantStatus(applied_revision=applied, short_revision="stale")
    assert status.short_revision == short
    assert TenantStatus.model_validate(status.wire()).short_revision == short


def _crd_accepts(crd: Obj, schema: Obj, obj: Obj) -> bool:
    result = admit(ResourceType.from_crd(crd), copy.deepcopy(obj))
    return not result.errors and not cel_violations(schema, obj)


@pytest.mark.parametrize(
    "memory",
    [0, "0", "0Mi", "0.0", ".0", -5, "-1Gi", "1x", 33554432, "0.5Gi", "10Gi", "1e9", "2e8"],
)
def test_crd_and_models_agree_on_quantities(crd: Obj, schema: Obj, memory: object) -> None:
    obj = _broken("spec.resources.memory", memory)
    try:
        Tenant.from_object(obj)
        model_accepts = True
    except ValidationError:
        model_accepts = False
    assert _crd_accepts(crd, schema, obj) == model_accepts


@pytest.mark.parametrize("memory", [1, "500m", "0.5", "1e3", "1Mi", "2Pi"])
def test_quantities_out_of_the_shims_range_pass_the_crd_and_fail_the_models(
    crd: Obj, schema: Obj, memory: object
) -> None:
    """Well-formed but out of range: the API server (no quantity arithmetic in its schema) takes
    it, the models refuse it and the operator reports it as Stalled/InvalidSpec."""
    obj = _broken("spec.resources.memory", memory)
    assert _crd_accepts(crd, schema, obj)
    with pytest.raises(ValidationError, match="is out of range: give 16Mi to 1Pi"):
        Tenant.from_object(obj)
