"""Every sample Tenant (and every Argo CD health fixture) is what the API server would accept."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from bitbuilder.operator.api import Tenant
from tests.foundation.conftest import EXAMPLES, HEALTH_DIR, load_documents
from tests.helpers.cel_rules import cel_violations
from tests.helpers.kube_schema import ResourceType, admit

Obj = dict[str, Any]


def _tenants(folder: Path) -> list[tuple[str, Obj]]:
    return [
        (f"{path.relative_to(folder)}:{doc['metadata']['name']}", doc)
        for path in sorted(folder.rglob("*.yaml"))
        for doc in load_documents(path)
        if doc.get("kind") == "Tenant"
    ]


SAMPLES = _tenants(EXAMPLES)
FIXTURES = _tenants(HEALTH_DIR / "testdata")


def _accepted(crd: Obj, schema: Obj, obj: Obj) -> None:
    """Pruning, defaulting and validation as the API server does, plus its CEL rules; strict:
    an unknown field (which the server would prune) is an error here."""
    admitted = copy.deepcopy(obj)
    result = admit(ResourceType.from_crd(crd), admitted)
    assert result.pruned == [], "unknown fields"
    assert result.errors == []
    assert cel_violations(schema, admitted) == []


@pytest.mark.parametrize(("where", "tenant"), SAMPLES, ids=[w for w, _ in SAMPLES])
def test_sample_is_accepted_by_crd_and_models(
    crd: Obj, schema: Obj, where: str, tenant: Obj
) -> None:
    _accepted(crd, schema, tenant)
    assert Tenant.from_object(tenant).metadata.name == tenant["metadata"]["name"]


@pytest.mark.parametrize(("where", "tenant"), FIXTURES, ids=[w for w, _ in FIXTURES])
def test_health_fixture_is_a_valid_live_tenant(
    crd: Obj, schema: Obj, where: str, tenant: Obj
) -> None:
    _accepted(crd, schema, tenant)
    Tenant.from_object(tenant)


def test_samples_cover_each_kind_of_tenant() -> None:
    specs = [Tenant.from_object(t).spec for _, t in SAMPLES]
    assert any(s.runtime == "nspawn" and s.source and s.source.ref.branch for s in specs)
    assert any(s.runtime == "vmspawn" for s in specs)
    assert any(s.source and s.source.ref.commit for s in specs)
    assert any(s.suspend for s in specs)


def test_flux_health_checks_name_sample_tenants() -> None:
    names = {t["metadata"]["name"] for _, t in SAMPLES}
    docs = {d["kind"]: d for d in load_documents(EXAMPLES / "flux" / "fleet.yaml")}
    checks = docs["Kustomization"]["spec"]["healthChecks"]
    assert checks and all(c["kind"] == "Tenant" and c["name"] in names for c in checks)
    assert (
        docs["Kustomization"]["spec"]["sourceRef"]["name"]
        == docs["GitRepository"]["metadata"]["name"]
    )


def test_argocd_application_syncs_the_tenants_folder() -> None:
    [app] = load_documents(EXAMPLES / "argocd" / "application.yaml")
    assert app["kind"] == "Application"
    assert app["spec"]["source"]["path"] == "tenants"
