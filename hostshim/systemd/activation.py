"""Socket activation (sd_listen_fds): the listening socket systemd passed, if any.

With bitbuilder-hostshim.socket, systemd owns /run/bitbuilder/hostshim.sock and hands the
bound, listening socket to the service as fd 3; the server must use it instead of binding.
"""

from __future__ import annotations

import os
import socket
import stat

SD_LISTEN_FDS_START = 3


def listen_socket() -> socket.socket | None:
    """The first passed unix stream socket, or None when not socket-activated.

    The variables are removed so children (nspawn, git helpers) never think they were
    activated too."""
    pid = os.environ.pop("LISTEN_PID", None)
    count = os.environ.pop("LISTEN_FDS", None)
    os.environ.pop("LISTEN_FDNAMES", None)
    if pid is None or count is None or int(pid) != os.getpid() or int(count) < 1:
        return None
    fd = SD_LISTEN_FDS_START
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        return None
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        return None
    os.set_inheritable(fd, False)
    return sock
