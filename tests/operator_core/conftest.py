"""Fast, pure tests of the operator core: translation, status, the reconcile core against an
in-memory shim. No root, no containers."""

from __future__ import annotations

from typing import Any

import pytest

from bitbuilder.operator.api import Tenant

SHA_A = "a" * 40
SHA_B = "b" * 40


def tenant_object(name: str = "web", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "image": {"name": "base"},
        "source": {"url": "https://git.example/web.git", "ref": {"branch": "main"}},
    }
    body.update(spec)
    return {
        "apiVersion": "bitbuilder.io/v1alpha1",
        "kind": "Tenant",
        "metadata": {"name": name, "generation": 1},
        "spec": body,
    }


def make_tenant(name: str = "web", **spec: Any) -> Tenant:
    return Tenant.from_object(tenant_object(name, **spec))


@pytest.fixture
def tenant() -> Tenant:
    return make_tenant()
