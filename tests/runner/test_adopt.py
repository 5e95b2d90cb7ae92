"""A shim restart: machines started by one shim process are adopted, not restarted, by the next."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bitbuilder.hostshim.api import ResourceLimits
from bitbuilder.hostshim.machine.executor import RECORD, DirectExecutor, argv_hash
from bitbuilder.hostshim.paths import TenantPaths
from tests.helpers.wait import wait_for
from tests.runner.conftest import (
    assert_gone,
    make_shim,
    needs_nspawn,
    runner_config,
    stop_all,
    unique_name,
)

# A whole shim lifetime in a child process: start machines, print them, exit.
_FIRST_SHIM = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from tests.runner.conftest import make_shim
    shim = make_shim(Path(sys.argv[1]), Path(sys.argv[2]))
    machines = [shim.start(name) for name in sys.argv[3:]]
    print(json.dumps({m.name: [m.leader_pid, m.started_at.isoformat(), m.address]
                      for m in machines}))
    """
)


@pytest.mark.nspawn
@needs_nspawn
def test_new_shim_adopts_running_machines(tmp_path: Path, busybox_rootfs: Path) -> None:
    names = [unique_name(), unique_name()]
    first = subprocess.run(
        [sys.executable, "-c", _FIRST_SHIM, str(tmp_path), str(busybox_rootfs), *names],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[2],
        timeout=120,
    )
    second = make_shim(tmp_path, busybox_rootfs)  # a new shim over the same dirs
    second.started = names
    try:
        assert first.returncode == 0, first.stderr
        before = json.loads(first.stdout)
        adopted = second.runner.adopt()
        assert sorted(adopted) == sorted(names), "machines outlive the shim that started them"
        for name, (leader, started_at, address) in before.items():
            assert adopted[name].leader_pid == leader, "adopted, not restarted"
            assert adopted[name].started_at.isoformat() == started_at
            assert adopted[name].address == address
        assert second.run_in(adopted[names[0]], "ps", "-o", "args").returncode == 0
        left = second.leftovers(names[0])
        second.runner.stop(names[0])
        assert_gone(left)
        assert sorted(second.runner.adopt()) == [names[1]]
    finally:
        stop_all(second)


def test_pid_record_must_match_start_time_and_command(tmp_path: Path) -> None:
    """A recorded pid counts only while its start time and command line match /proc."""
    config = runner_config(tmp_path, tmp_path)
    executor = DirectExecutor(config)
    record = TenantPaths(config, "m1").run / RECORD
    record.parent.mkdir(parents=True)
    me = os.getpid()
    stat = Path(f"/proc/{me}/stat").read_text()
    start_time = int(stat[stat.rindex(")") + 2 :].split()[19])
    cmdline = Path(f"/proc/{me}/cmdline").read_bytes().rstrip(b"\0").decode().split("\0")

    def write(start: int, argv: list[str]) -> None:
        data = {"pid": me, "startTime": start, "argvHash": argv_hash(argv), "cgroups": {}}
        record.write_text(json.dumps(data))

    write(start_time, cmdline)
    assert executor.pid("m1") == me
    assert executor.running() == ["m1"]
    write(start_time + 1, cmdline)  # the pid was reused by a younger process
    assert executor.pid("m1") is None
    write(start_time, ["systemd-nspawn", "--other"])  # same pid, different program
    assert executor.pid("m1") is None
    assert executor.running() == []
    assert executor.pid("never-started") is None


def test_executor_launch_detaches_and_terminate_reaps(tmp_path: Path) -> None:
    """A plain command through the executor: own session, logged, gone after terminate."""
    if os.geteuid() != 0:
        pytest.skip("needs root (cgroups)")
    config = runner_config(tmp_path, tmp_path)
    executor = DirectExecutor(config)
    log = tmp_path / "log"
    argv = ["/bin/sh", "-c", "echo started; sleep 600"]
    pid = executor.launch("m2", argv, ResourceLimits(tasks=8), log)
    try:
        assert executor.pid("m2") == pid
        assert os.getsid(pid) == pid, "own session: a shim's terminal or group kill misses it"
        cgroups = executor.cgroups("m2")
        assert cgroups is not None and pid in cgroups.pids()
        # the output reaches the log through the console reader (a pipe), not at once
        wait_for(lambda: "started" in log.read_text(), 5, what="output in the log")
    finally:
        executor.terminate("m2", timeout=5)
    assert executor.pid("m2") is None
    assert not [d for d in cgroups.dirs if d.exists()]
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), 5, what="reaped, no zombie")
