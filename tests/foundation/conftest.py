"""Fixtures for the foundation tests: the repository, its CRD and its manifests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from bitbuilder.operator.crd import render_crd

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "tenants.bitbuilder.io.yaml"
EXAMPLES = REPO / "manifests" / "examples"
HEALTH_DIR = REPO / "manifests" / "argocd" / "bitbuilder.io" / "Tenant"


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.fixture(scope="session")
def crd() -> dict[str, Any]:
    """The CRD as `bitbuilder crd` renders it now."""
    document: dict[str, Any] = yaml.safe_load(render_crd())
    return document


@pytest.fixture(scope="session")
def schema(crd: dict[str, Any]) -> dict[str, Any]:
    version: dict[str, Any] = crd["spec"]["versions"][0]
    openapi: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return openapi
