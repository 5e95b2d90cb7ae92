"""The Argo CD health check (health.lua) against each live-Tenant fixture, run with real Lua."""

from __future__ import annotations

from typing import Any

import lupa
import pytest
import yaml

from tests.foundation.conftest import HEALTH_DIR, load_documents

CASES: list[dict[str, Any]] = yaml.safe_load((HEALTH_DIR / "health_test.yaml").read_text())["tests"]


def health(obj: dict[str, Any]) -> dict[str, str]:
    """Run health.lua the way Argo CD does: the live object as the global `obj`."""
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute((HEALTH_DIR / "health.lua").read_text())
    return {"status": result["status"], "message": result["message"]}


@pytest.mark.parametrize("case", CASES, ids=[c["inputPath"] for c in CASES])
def test_health(case: dict[str, Any]) -> None:
    [obj] = load_documents(HEALTH_DIR / case["inputPath"])
    assert health(obj) == case["healthStatus"]


def test_every_health_state_has_a_fixture() -> None:
    states = {c["healthStatus"]["status"] for c in CASES}
    assert states == {"Healthy", "Progressing", "Degraded", "Suspended"}
    inputs = {c["inputPath"] for c in CASES}
    assert inputs == {f"testdata/{p.name}" for p in (HEALTH_DIR / "testdata").glob("*.yaml")}
    assert {"testdata/deleting.yaml", "testdata/suspended.yaml"} <= inputs
