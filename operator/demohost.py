"""The moving parts `bitbuilder demo` starts: git repos served on loopback, the host shim, the
standalone reconciler. Each is a child process in its own session (so `--keep` can leave them
running), with its log in the demo's work dir, stopped by its own pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIT_ENV = {
    "GIT_AUTHOR_NAME": "BitBuilder demo",
    "GIT_AUTHOR_EMAIL": "demo@bitbuilder.invalid",
    "GIT_COMMITTER_NAME": "BitBuilder demo",
    "GIT_COMMITTER_EMAIL": "demo@bitbuilder.invalid",
    "GIT_CONFIG_NOSYSTEM": "1",
}

CHILDREN = "children.json"


class DemoError(Exception):
    pass


def git(*args: str, cwd: Path | None = None) -> str:
    env = {**os.environ, **GIT_ENV, "HOME": str(cwd or Path.cwd())}
    done = subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise DemoError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tool(name: str) -> str:
    """A console script of this installation (next to the interpreter), else from PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise DemoError(f"{name} not found")
    return found


@dataclass
class Repo:
    """A work tree pushing to a bare repo under the served folder."""

    name: str
    bare: Path
    work: Path

    @classmethod
    def create(cls, served: Path, workdir: Path, name: str) -> Repo:
        repo = cls(name, served / f"{name}.git", workdir / name)
        git("init", "-q", "--bare", "-b", "main", str(repo.bare))
        git("init", "-q", "-b", "main", str(repo.work))
        git("remote", "add", "origin", str(repo.bare), cwd=repo.work)
        return repo

    def commit(self, files: dict[str, str], message: str) -> str:
        for rel, text in files.items():
            path = self.work / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        git("add", "-A", cwd=self.work)
        git("commit", "-q", "-m", message, cwd=self.work)
        return self.push()

    def revert(self, commit: str) -> str:
        git("revert", "--no-edit", commit, cwd=self.work)
        return self.push()

    def push(self) -> str:
        git("push", "-q", "origin", "HEAD:refs/heads/main", cwd=self.work)
        return git("rev-parse", "HEAD", cwd=self.work)


def stop_process(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, and SIGKILL if it is still there after `timeout` seconds; reaped either way."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Processes:
    """Children started by the demo, stopped in reverse order. Their names and pids are also
    written to `children.json` in the logs folder, so `bitbuilder demo --clean` can stop what a
    `--keep` run left behind."""

    logs: Path
    children: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        self.logs.mkdir(parents=True, exist_ok=True)
        with (self.logs / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        self.children.append((name, proc))
        self._record()
        return proc

    def _record(self) -> None:
        pids = [[name, proc.pid] for name, proc in self.children]
        (self.logs / CHILDREN).write_text(json.dumps(pids))

    def check(self) -> None:
        for name, proc in self.children:
            if proc.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace")[-2000:]
                raise DemoError(f"{name} exited with {proc.returncode}; its log ends:\n{tail}")

    def stop(self, *names: str, timeout: float = 20.0) -> None:
        """Stop these children (all if none named), the last started first."""
        for entry in reversed(list(self.children)):
            name, proc = entry
            if names and name not in names:
                continue
            stop_process(proc, timeout)
            self.children.remove(entry)
        if self.logs.is_dir():
            self._record()

    def stop_all(self, timeout: float = 20.0) -> None:
        self.stop(timeout=timeout)


def stop_recorded(logs: Path, *names: str, timeout: float = 20.0) -> list[str]:
    """Stop the children a kept demo left running (all, or these names), by their recorded
    pids — each only while it still is that process (its command line names the demo folder).
    Returns the names stopped."""
    marker = str(logs.parent).encode()
    entries: list[list[Any]] = json.loads((logs / CHILDREN).read_text())
    stopped = []
    for name, pid in reversed(entries):
        if (names and name not in names) or not _runs(pid, marker):
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _runs(pid, marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _runs(pid, marker):
            os.kill(pid, signal.SIGKILL)
        stopped.append(name)
    return stopped


def _runs(pid: int, marker: bytes) -> bool:
    try:
        return marker in Path(f"/proc/{pid}/cmdline").read_bytes()  # empty once a zombie
    except OSError:
        return False


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"process {proc.args!r} exited early")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise DemoError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


def start_git_daemon(procs: Processes, served: Path) -> int:
    port = free_port()
    proc = procs.start(
        "git-daemon",
        ["git", "daemon", "--reuseaddr", "--listen=127.0.0.1", f"--port={port}", "--export-all",
         f"--base-path={served}", str(served)],
    )  # fmt: skip
    wait_port(port, proc)
    return port


def build_base_image(dest: Path) -> None:
    # The shim's own tool: the operator side imports nothing of the shim but its API.
    subprocess.run([tool("bitbuilder-hostshim-mkimage"), str(dest)], check=True)
