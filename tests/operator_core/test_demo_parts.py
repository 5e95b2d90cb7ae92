"""Pieces of `bitbuilder demo`: what its clean-up may delete, when it stops waiting."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bitbuilder.hostshim.api import ErrorInfo, MachineStatus
from bitbuilder.operator import demo
from bitbuilder.operator.demo import mounts_under
from bitbuilder.operator.demohost import DemoError
from bitbuilder.operator.localstate import observe
from bitbuilder.operator.status import Observation, blocking_problem, compute_status
from tests.operator_core.conftest import SHA_A, make_tenant


def test_mounts_under() -> None:
    assert "/proc" in mounts_under(Path("/proc"))
    assert "/proc" in mounts_under(Path("/"))
    assert mounts_under(Path("/pro")) == []  # a prefix of a name is not a parent folder


def test_no_mounts_in_a_fresh_folder(tmp_path: Path) -> None:
    assert mounts_under(tmp_path) == []


def test_ctrl_c_cleans_up_and_exits_130_without_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def interrupted(self: demo.Demo) -> None:
        raise KeyboardInterrupt

    cleaned: list[bool] = []
    monkeypatch.setattr(demo, "preflight", lambda: None)
    monkeypatch.setattr(demo.Demo, "run", interrupted)
    monkeypatch.setattr(demo, "cleanup", lambda _demo, keep_files: cleaned.append(keep_files))
    assert demo.run_demo(tmp_path / "work", keep=False) == 130
    assert cleaned == [False]
    assert capsys.readouterr().err == "interrupted\n"


def test_waiting_stops_at_once_with_the_reason_when_a_tenant_cannot_run(tmp_path: Path) -> None:
    """It used to print 'Failed (waiting)' for three minutes and end with a timeout."""
    failed = MachineStatus(
        name="web", phase="Failed", runtime="nspawn", spec_hash="h",
        machine_error=ErrorInfo(
            reason="NetworkFailed", message="sysctl: permission denied", at=datetime.now(UTC)
        ),
    )  # fmt: skip
    web = make_tenant("web")
    now = datetime.now(UTC)
    status = compute_status(Observation(web, failed, "node1", now), None)
    the_demo = demo.Demo(tmp_path)
    the_demo.state.save(observe(None, web, now).model_copy(update={"status": status}))
    started = time.monotonic()
    with pytest.raises(
        DemoError, match=r"web is Failed \(NetworkFailed: sysctl: permission denied"
    ):
        asyncio.run(the_demo.wait_revisions({"web": SHA_A}, "web Running"))
    assert time.monotonic() - started < demo.STEP_TIMEOUT / 2


def test_blocking_problem_is_none_while_a_tenant_may_still_get_there() -> None:
    web = make_tenant("web")
    now = datetime.now(UTC)
    starting = MachineStatus(name="web", phase="Starting", runtime="nspawn", spec_hash="h")
    assert blocking_problem(compute_status(Observation(web, starting, "n", now), None)) is None
    assert blocking_problem(None) is None
