"""`bitbuilder get tenants`: kubectl's columns, ages and errors, from standalone state files."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from bitbuilder.hostshim.api import AppliedRevision, MachineStatus
from bitbuilder.operator.cli import main
from bitbuilder.operator.get import human_age, render
from bitbuilder.operator.localstate import FleetRecord, LocalState, observe
from bitbuilder.operator.status import Observation, Problem, compute_status
from tests.operator_core.conftest import SHA_A, make_tenant

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"), (119, "119s"), (120, "2m"), (125, "2m5s"), (600, "10m"), (179 * 60, "179m"),
        (3 * 3600, "3h"), (3 * 3600 + 60, "3h1m"), (8 * 3600, "8h"), (47 * 3600, "47h"),
        (48 * 3600, "2d"), (50 * 3600, "2d2h"), (8 * 86400, "8d"), (800 * 86400, "2y70d"),
        (9 * 365 * 86400, "9y"), (-5, "0s"),
    ],
)  # fmt: skip
def test_human_age_like_kubectl(seconds: int, text: str) -> None:
    assert human_age(seconds) == text


def seed(state: LocalState) -> None:
    running = MachineStatus(
        name="web", phase="Running", runtime="nspawn", spec_hash="h",
        source_revision=f"main@sha1:{SHA_A}", applied_revision=SHA_A,
        history=[AppliedRevision(revision=SHA_A, applied_at=T0)], address="10.0.0.2",
    )  # fmt: skip
    web = make_tenant("web")
    status = compute_status(Observation(web, running, "node1", T0), None)
    state.save(observe(None, web, T0).model_copy(update={"status": status}))
    state.save(observe(None, make_tenant("db", runtime="vmspawn"), T0 + timedelta(hours=1)))
    state.save_fleet(FleetRecord(source="f", problems=["x.yaml (tenant 'bad'): cpu: wrong"]))


def test_table(tmp_path: Path) -> None:
    state = LocalState(tmp_path)
    seed(state)
    text = render(state.records(), "table", T0 + timedelta(hours=2))
    assert text.splitlines() == [
        "NAME   RUNTIME   PHASE     REVISION   NODE    READY   AGE",
        "db     vmspawn                                        60m",
        f"web    nspawn    Running   {SHA_A[:7]}    node1   True    120m",
    ]
    assert render([], "table", T0) == "No resources found\n"


def test_yaml_lists_tenants_with_status(tmp_path: Path) -> None:
    state = LocalState(tmp_path)
    seed(state)
    doc = yaml.safe_load(render(state.records(), "yaml", T0))
    assert doc["kind"] == "List" and [i["metadata"]["name"] for i in doc["items"]] == ["db", "web"]
    assert doc["items"][1]["status"]["phase"] == "Running"
    assert doc["items"][1]["metadata"]["generation"] == 1


def test_cli_names_and_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seed(LocalState(tmp_path))
    assert main(["get", "tenants", "web", "--state-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert [line.split()[0] for line in out.splitlines()] == ["NAME", "web"]
    assert "warning: skipped manifest x.yaml (tenant 'bad'): cpu: wrong" in err
    assert main(["get", "tn", "nope", "--state-dir", str(tmp_path)]) == 1
    assert 'tenants "nope" not found' in capsys.readouterr().err


def test_cli_warns_once_when_the_shim_is_unreachable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """READY Unknown alone does not say why: the reason the tenants wait is printed once."""
    state = LocalState(tmp_path)
    problem = Problem("ShimUnavailable", "host shim at /s unreachable", "MachineReady", True)
    for name in ("web", "db"):
        tenant = make_tenant(name)
        status = compute_status(Observation(tenant, None, "node1", T0, problem), None)
        state.save(observe(None, tenant, T0).model_copy(update={"status": status}))
    with state.lock():  # a `bitbuilder run` is running: only the shim's problem is news
        assert main(["get", "tenants", "--state-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert [line.split()[-2] for line in out.splitlines()[1:]] == ["Unknown", "Unknown"]
    assert err == "warning: host shim at /s unreachable\n"


def test_cli_says_when_no_reconciler_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Old state with no hint reads as live state: the table says when nobody follows the fleet."""
    state = LocalState(tmp_path)
    seed(state)
    assert main(["get", "tenants", "--state-dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert f"warning: no `bitbuilder run` is using {tmp_path}: this is the status it last" in err
    assert not state.reconciler_running()
    with state.lock():
        assert state.reconciler_running()
        assert main(["get", "tenants", "--state-dir", str(tmp_path)]) == 0
        assert "no `bitbuilder run`" not in capsys.readouterr().err
    assert not state.reconciler_running()


def test_cli_unreadable_state_is_an_error_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def denied(self: LocalState) -> None:
        raise PermissionError(13, "Permission denied", str(self.root / "tenants"))

    monkeypatch.setattr(LocalState, "records", denied)
    assert main(["get", "tenants", "--state-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: [Errno 13] Permission denied") and "root's" in err
