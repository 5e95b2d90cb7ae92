"""Socket activation: the socket systemd passes as fd 3 is taken, others are not."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

CHILD = """
import os, sys
from bitbuilder.hostshim.systemd.activation import listen_socket
os.dup2(int(sys.argv[1]), 3)
os.environ["LISTEN_PID"] = str(os.getpid()) if sys.argv[2] == "me" else "1"
os.environ["LISTEN_FDS"] = "1"
sock = listen_socket()
print(sock.getsockname() if sock else None, os.environ.get("LISTEN_FDS"))
"""


def child(fd: int, pid: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(fd), pid],
        pass_fds=(fd,),
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


def test_the_passed_listening_socket_is_used(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(path)
        sock.listen()
        # The variables are consumed either way: children must not see them.
        assert child(sock.fileno(), "me") == f"{path} None"
        assert child(sock.fileno(), "other") == "None None"


def test_a_non_socket_fd_is_ignored(tmp_path: Path) -> None:
    with open(tmp_path / "file", "w") as f:
        assert child(f.fileno(), "me") == "None None"
