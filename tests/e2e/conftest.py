"""End-to-end tests against a real cluster: run only when KUBECONFIG points at one.

Only the standard library and pytest are imported here, so collecting this folder works on any
machine; every test is skipped, saying why, when no cluster is given.

    KUBECONFIG=~/.kube/config pytest tests/e2e            # CRD, schema, printing, generation
    BITBUILDER_E2E_REPO=https://... pytest tests/e2e      # also: a Tenant becomes Ready
      (needs the operator image loaded and a host shim on the node; see README)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
KUBECONFIG = os.environ.get("KUBECONFIG", "")
KUBECTL = shutil.which(
    "kubectl", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
)
WHY_SKIPPED = (
    "no real cluster: set KUBECONFIG to a k3s or kind cluster to run the e2e suite"
    if not KUBECONFIG
    else "kubectl is not installed"
    if KUBECTL is None
    else ""
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.e2e)
            if WHY_SKIPPED:
                item.add_marker(pytest.mark.skip(reason=WHY_SKIPPED))


def kubectl(
    *args: str, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    assert KUBECTL is not None
    done = subprocess.run(
        [KUBECTL, *args], input=stdin, capture_output=True, text=True, timeout=180, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {done.stderr.strip()}")
    return done


def get_json(*args: str) -> Any:
    return json.loads(kubectl("get", *args, "-o", "json").stdout)


@pytest.fixture(scope="session")
def installed() -> None:
    """`kubectl apply -k manifests/base`, and the CRD established."""
    kubectl("apply", "-k", str(ROOT / "manifests" / "base"))
    kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/tenants.bitbuilder.io")


@pytest.fixture
def tenant_name(installed: None) -> Iterator[str]:
    """A unique Tenant name, removed afterwards (its finalizer too, if no operator runs)."""
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    yield name
    kubectl("delete", "tenant", name, "--ignore-not-found", "--timeout=60s", check=False)
    patch = json.dumps({"metadata": {"finalizers": None}})
    kubectl("patch", "tenant", name, "--type=merge", "-p", patch, check=False)
