"""The kopf operator against an emulated Kubernetes API (tests/helpers/kube_emulator.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bitbuilder.operator.crd import tenant_crd
from tests.helpers.kube_emulator import Emulator, EmulatorThread
from tests.helpers.kube_http import Kube


@pytest.fixture
def api() -> Iterator[EmulatorThread]:
    """A fresh emulated API server serving the Tenant CRD, on 127.0.0.1."""
    with EmulatorThread(Emulator([tenant_crd()])) as server:
        yield server


@pytest.fixture
def kube(api: EmulatorThread) -> Kube:
    return Kube(api.url)
