"""The harness itself: systemd is PID 1 inside, commands run as units, the project is there."""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

from tests.system.testhost import TestHost, python_binds


def test_systemd_is_pid1_and_newer(testhost: TestHost) -> None:
    assert testhost.enter("cat", "/proc/1/comm").stdout.strip() == "systemd"
    version = testhost.enter("systemctl", "--version").stdout.split()[1]
    assert int(version) >= 257
    assert testhost.enter("systemctl", "is-active", "systemd-networkd").stdout.strip() == "active"


def test_run_is_a_unit_and_passes_exit_codes(testhost: TestHost) -> None:
    cgroup = testhost.run("cat", "/proc/self/cgroup").stdout
    assert "/system.slice/run-" in cgroup
    assert testhost.run("sh", "-c", "exit 7", check=False).returncode == 7


def test_project_python_runs_inside(testhost: TestHost) -> None:
    code = "import bitbuilder.hostshim.api, pygit2, ssl, sqlite3; print('ok')"
    assert testhost.run(sys.executable, "-c", code).stdout.strip() == "ok"


def test_binds_cover_the_interpreter_and_the_checkout() -> None:
    binds = python_binds()
    needed = [
        Path(sys.executable).resolve(),
        Path(sysconfig.get_path("stdlib")).resolve(),
        Path(sys.prefix).resolve(),
        Path(__file__).resolve(),
    ]
    for path in needed:
        assert any(b == path or b in path.parents for b in binds), path
