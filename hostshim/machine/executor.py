"""Executors run a machine's command line and find it again: direct (supervised here) or systemd.

The direct executor starts the command detached (its own session, output to a log file), so it
outlives the shim; a new shim finds it through the record under the machine's run dir: pid,
the kernel's start time of that pid and a hash of its command line. A pid is only ever taken
for the machine while all three match /proc, so a reused pid is never mistaken for a tenant.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from bitbuilder.hostshim.api import ResourceLimits
from bitbuilder.hostshim.config import ShimConfig
from bitbuilder.hostshim.errors import MachineError
from bitbuilder.hostshim.machine.cgroups import (
    MachineCgroups,
    create_cgroups,
    machine_cgroups,
    signal_pid,
)
from bitbuilder.hostshim.machine.live import exited
from bitbuilder.hostshim.machine.reaper import REAPER
from bitbuilder.hostshim.paths import TenantPaths
from bitbuilder.hostshim.timing import phase

RECORD = "executor.json"
EXEC_DEADLINE = 10.0
KILL_DEADLINE = 10.0
# Writes its own pid into each cgroup.procs given before `--`, then execs the rest: the machine
# is inside its limits before nspawn runs, without Python code between fork and exec.
_ENTER_CGROUPS = (
    'while [ "$1" != -- ]; do echo $$ > "$1" || exit 121; shift; done; shift; exec "$@"'
)


# The console reader: the first $1 bytes the machine prints (its start, and nspawn's own
# errors) go to the log file $2, the rest is read and dropped. A machine cannot fill the runtime
# dir (a tmpfs) however much it prints, nor block on its console. The log is private (0600):
# a machine may print secrets, and the runtime dir is open to the socket's group.
# (stdbuf: head writes each read at once instead of holding it in a stdio buffer.)
_CONSOLE_READER = 'umask 077; stdbuf -o0 head -c "$1" > "$2"; exec cat > /dev/null'
CONSOLE_LOG_BYTES = 1 << 20

# Newer systemd inside a machine refuses to boot on a host with v1 controllers without it.
_LAUNCH_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1",
}


class Executor(Protocol):
    def launch(
        self,
        name: str,
        argv: list[str],
        limits: ResourceLimits,
        log: Path,
        env: Mapping[str, str] | None = None,
    ) -> int: ...
    def terminate(self, name: str, timeout: float) -> None: ...
    def pid(self, name: str) -> int | None: ...
    def running(self) -> list[str]: ...


def in_cgroups(procs_files: list[Path], argv: list[str]) -> list[str]:
    """`argv` wrapped so its process joins the cgroups (cgroup.procs files) before it execs."""
    return ["/bin/sh", "-c", _ENTER_CGROUPS, "bb-enter", *map(str, procs_files), "--", *argv]


def shim_scope(config: ShimConfig) -> str:
    """Tells apart host-global names (cgroups, links) of shims with different runtime dirs."""
    return hashlib.sha256(str(config.runtime_dir.resolve()).encode()).hexdigest()[:8]


def argv_hash(argv: list[str]) -> str:
    return hashlib.sha256("\0".join(argv).encode()).hexdigest()


def _proc_identity(pid: int) -> tuple[int, str] | None:
    """(start time, cmdline hash) of a live, non-zombie pid; None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    argv = cmdline.rstrip(b"\0").decode(errors="replace").split("\0")
    return int(fields[19]), argv_hash(argv)


def wait_exit(pid: int, timeout: float) -> bool:
    """Wait for `pid` to exit (pidfd + poll, no polling loop); True when it is gone."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return exited(fd, timeout)
    finally:
        os.close(fd)


class DirectExecutor:
    def __init__(self, config: ShimConfig) -> None:
        self.config = config
        self.scope = shim_scope(config)

    def _record_path(self, name: str) -> Path:
        return TenantPaths(self.config, name).run / RECORD

    def _record(self, name: str) -> dict[str, object] | None:
        try:
            data = json.loads(self._record_path(name).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        assert isinstance(data, dict)
        return data

    def launch(
        self,
        name: str,
        argv: list[str],
        limits: ResourceLimits,
        log: Path,
        env: Mapping[str, str] | None = None,
    ) -> int:
        if self.pid(name) is not None:
            raise MachineError(f"machine {name!r} is already running", reason="AlreadyRunning")
        with phase(name, "cgroups"):
            cgroups = create_cgroups(self.scope, name, limits, self.config.default_memory_bytes)
        try:
            with phase(name, "nspawn exec"):
                return self._spawn(name, argv, cgroups, log, {**_LAUNCH_ENV, **(env or {})})
        except BaseException:
            self._empty(cgroups)
            cgroups.remove()
            raise

    def _spawn(
        self, name: str, argv: list[str], cgroups: MachineCgroups, log: Path, env: dict[str, str]
    ) -> int:
        log.parent.mkdir(parents=True, exist_ok=True)
        # Outside the machine's cgroups, so stopping the machine never kills it before it has
        # written the last lines; it ends when nspawn closes the pipe.
        reader = subprocess.Popen(
            ["/bin/sh", "-c", _CONSOLE_READER, "bb-console", str(CONSOLE_LOG_BYTES), str(log)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
            env=_LAUNCH_ENV,
        )
        assert reader.stdin is not None
        with reader.stdin as out:
            proc = subprocess.Popen(
                in_cgroups(cgroups.procs_files(), argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                env=env,
            )
        # This shim reaps its own children; after a restart, init reaps the adopted ones.
        for child in (proc, reader):
            REAPER.add(child)
        identity = self._await_exec(proc, argv)
        record = {
            "pid": proc.pid,
            "startTime": identity[0],
            "argvHash": identity[1],
            "cgroups": cgroups.to_json(),
        }
        path = self._record_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.rename(path)
        return proc.pid

    def _await_exec(self, proc: subprocess.Popen[bytes], argv: list[str]) -> tuple[int, str]:
        """Until the wrapper has exec'd nspawn: then /proc shows the argv we record."""
        wanted = argv_hash(argv)
        deadline = time.monotonic() + EXEC_DEADLINE
        while time.monotonic() < deadline:
            identity = _proc_identity(proc.pid)
            if identity is None:
                break
            if identity[1] == wanted:
                return identity
            time.sleep(0.002)
        raise MachineError(f"{argv[0]} did not start (wrapper exit {proc.poll()})")

    def pid(self, name: str) -> int | None:
        record = self._record(name)
        if record is None:
            return None
        pid = record.get("pid")
        assert isinstance(pid, int)
        identity = _proc_identity(pid)
        if identity != (record.get("startTime"), record.get("argvHash")):
            return None
        return pid

    def cgroups(self, name: str) -> MachineCgroups | None:
        record = self._record(name)
        if record is None:
            return None
        data = record.get("cgroups")
        assert isinstance(data, dict)
        return MachineCgroups.from_json(data)

    def terminate(self, name: str, timeout: float) -> None:
        """SIGTERM (nspawn powers the machine off); past `timeout` a second SIGTERM (nspawn
        kills the machine), then SIGKILL; finally SIGKILL whatever is left in its cgroups."""
        pid = self.pid(name)
        if pid is not None:
            signal_pid(pid, signal.SIGTERM)
            if not wait_exit(pid, timeout):
                signal_pid(pid, signal.SIGTERM)  # nspawn: a second one ends the machine at once
                if not wait_exit(pid, KILL_DEADLINE):
                    signal_pid(pid, signal.SIGKILL)
                    wait_exit(pid, KILL_DEADLINE)
        # Without a record (a crash between spawning and recording), where they would be.
        cgroups = self.cgroups(name) or machine_cgroups(self.scope, name)
        if cgroups is not None:
            self._empty(cgroups)
            cgroups.remove()
        self._record_path(name).unlink(missing_ok=True)

    def _empty(self, cgroups: MachineCgroups) -> None:
        cgroups.kill_all()
        for pid in cgroups.pids():
            signal_pid(pid, signal.SIGKILL)
            if not wait_exit(pid, KILL_DEADLINE):
                raise MachineError(f"process {pid} of a stopped machine does not die")

    def running(self) -> list[str]:
        machines = self.config.runtime_dir / "machines"
        if not machines.is_dir():
            return []
        return sorted(d.name for d in machines.iterdir() if self.pid(d.name) is not None)


def select_executor(config: ShimConfig) -> Executor:
    """ "direct", "systemd", or "auto": systemd when PID 1 is systemd, else direct."""
    choice = config.executor
    if choice == "auto":
        choice = "systemd" if Path("/run/systemd/system").is_dir() else "direct"
    if choice == "direct":
        return DirectExecutor(config)
    if choice == "systemd":
        from bitbuilder.hostshim.systemd.executor import SystemdExecutor

        return SystemdExecutor(default_memory=config.default_memory_bytes)
    raise MachineError(f"unknown executor {config.executor!r}", reason="InvalidConfig")
