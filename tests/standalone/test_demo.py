"""`bitbuilder demo` end to end: what the README promises, and that it cleans up after itself."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.standalone.conftest import BIN, REAL_HOST

pytestmark = [*REAL_HOST, pytest.mark.slow]


def pids_naming(folder: Path) -> list[str]:
    """Processes whose command line names `folder`."""
    found = subprocess.run(["pgrep", "-f", str(folder)], capture_output=True, text=True)
    return found.stdout.split()


def assert_nothing_left(work: Path) -> None:
    """The demo's folder is gone, and no process or mount names it."""
    assert not work.exists()
    left = pids_naming(work)
    assert left == [], f"processes left behind: {left}"
    assert str(work) not in Path("/proc/mounts").read_text()


def test_demo_runs_the_story_and_leaves_nothing(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    done = subprocess.run(
        [str(BIN / "bitbuilder"), "demo", "--workdir", str(work)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    tables = re.findall(r"NAME +RUNTIME +PHASE +REVISION +NODE +READY +AGE\n((?: +\S.*\n)+)", out)
    assert len(tables) == 3, out  # after start, after the update, after the rollback
    revisions = []
    for table in tables:
        rows = {line.split()[0]: line.split() for line in table.splitlines()}
        assert set(rows) == {"demo-web", "demo-api"}
        assert all(r[2] == "Running" and r[5] == "True" for r in rows.values()), table
        revisions.append((rows["demo-web"][3], rows["demo-api"][3]))
    (web1, api1), (web2, api2), (web3, api3) = revisions
    assert api1 == api2 == api3  # the other tenant is untouched
    assert len({web1, web2, web3}) == 3  # v1, the change, the revert commit
    assert out.count("inside demo-web: /etc/motd says: demo-web v1") == 2
    assert out.count("inside demo-web: /etc/motd says: demo-web v2") == 1
    assert out.count("inside demo-api: /etc/motd says: demo-api v1") == 3
    assert "update of demo-web running" in out and "rollback of demo-web running" in out
    assert f"{web3} has exactly the tree of {web1} (v1)" in out
    assert f"applied revisions of demo-web, newest first: {web3}, {web2}, {web1}" in out
    assert_nothing_left(work)


def test_demo_refuses_a_folder_that_holds_something(tmp_path: Path) -> None:
    (tmp_path / "precious").write_text("keep me")
    done = subprocess.run(
        [str(BIN / "bitbuilder"), "demo", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "not empty" in done.stderr
    assert (tmp_path / "precious").read_text() == "keep me"


def test_kept_demo_keeps_running_until_cleaned(tmp_path: Path) -> None:
    work = tmp_path / "kept"
    demo = [str(BIN / "bitbuilder"), "demo"]
    try:
        done = subprocess.run(
            [*demo, "--keep", "--workdir", str(work)], capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"bitbuilder demo --clean {work}" in done.stdout
        assert len(pids_naming(work)) >= 4  # git daemon, shim, reconciler, machines
        table = subprocess.run(
            [*demo[:1], "get", "tenants", "--state-dir", str(work / "standalone")],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert table.count("Running") == 2
    finally:
        cleaned = subprocess.run(
            [*demo, "--clean", str(work)], capture_output=True, text=True, timeout=120
        )
    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
    assert_nothing_left(work)


def test_clean_refuses_a_folder_that_is_no_kept_demo(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(BIN / "bitbuilder"), "demo", "--clean", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "not the folder of a kept demo" in done.stderr
    assert tmp_path.exists()
