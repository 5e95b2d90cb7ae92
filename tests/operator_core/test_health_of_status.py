"""The statuses this core computes, read by the Argo CD health check (health.lua, real Lua):
what Argo CD and Flux's kstatus would show for each situation."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from bitbuilder.hostshim.api import ErrorInfo, MachinePhase
from bitbuilder.operator.api import Tenant
from bitbuilder.operator.status import Observation, Problem, compute_status
from tests.foundation.test_argocd_health import health
from tests.operator_core.conftest import make_tenant
from tests.operator_core.test_status import machine

T0 = datetime(2026, 1, 1, tzinfo=UTC)
BAD = ErrorInfo(reason="LayoutError", message="units/x.service: not a unit", at=T0)


def live(tenant: Tenant, obs: dict[str, Any]) -> dict[str, Any]:
    status = compute_status(Observation(tenant, node="n1", now=T0, **obs), None)
    obj = tenant.model_dump(mode="json", by_alias=True, exclude_none=True)
    obj["status"] = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    return obj


@pytest.mark.parametrize(
    ("spec", "obs", "state", "words"),
    [
        ({}, {"machine": machine()}, "Healthy", "running main@sha1:"),
        ({}, {"machine": machine(source_error=BAD)}, "Degraded", "units/x.service"),
        ({}, {"machine": machine(MachinePhase.failed, applied_revision=None)}, "Degraded", ""),
        ({}, {"machine": machine(MachinePhase.pending, applied_revision=None)}, "Progressing", ""),
        ({}, {"machine": machine(MachinePhase.updating)}, "Progressing", "updating"),
        ({"suspend": True}, {"machine": machine(MachinePhase.stopped)}, "Suspended", ""),
        (
            {},
            {
                "machine": None,
                "problem": Problem("SecretNotFound", "secret 'git' not found", "SourceReady"),
            },
            "Degraded",
            "secret 'git'",
        ),
        (
            {},
            {
                "machine": None,
                "problem": Problem("ShimUnavailable", "refused", "MachineReady", True),
            },
            "Progressing",
            "refused",
        ),
    ],
)
def test_health_of_computed_status(
    spec: dict[str, Any], obs: dict[str, Any], state: str, words: str
) -> None:
    result = health(live(make_tenant(**spec), obs))
    assert result["status"] == state, result
    assert words in result["message"]
