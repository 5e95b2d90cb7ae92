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


def test_generators_can_import_the_project(testhost: TestHost) -> None:
    """systemd runs generators with a private /tmp: a checkout bound under /tmp (a CI clone)
    must still be importable there, or the project's generator restores nothing at boot."""
    probe = "/etc/systemd/system-generators/bb-harness-probe"
    script = (
        f"#!{sys.executable} -I\n"
        "import sys, pathlib, bitbuilder.hostshim.systemd.generator\n"
        "pathlib.Path(sys.argv[1], 'bb-harness-probe').write_text('imported')\n"
    )
    testhost.enter("mkdir", "-p", str(Path(probe).parent))
    testhost.enter("sh", "-c", f"cat > {probe} && chmod +x {probe}", input=script)
    try:
        testhost.enter("systemctl", "daemon-reload")
        out = testhost.enter("cat", "/run/systemd/generator/bb-harness-probe", check=False)
        assert out.stdout == "imported", out.stderr
    finally:
        testhost.enter("rm", "-f", probe)
        testhost.enter("systemctl", "daemon-reload")
