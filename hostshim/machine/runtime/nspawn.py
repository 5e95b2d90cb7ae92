"""What a machine needs from systemd-nspawn (252+): the argv, built from checked values only,
and how its running machine shows in /proc (the leader, and when it can take a stop request).

Every value that reaches the argv is validated here again (names, hostnames, environment,
paths), whatever the caller checked before: nothing arrives verbatim from a request or a
tenant repo. Paths are the shim's own (run dir, image rootfs, revision trees) and must not
contain the characters nspawn's list syntax gives meaning to.
"""

from __future__ import annotations

import os
import re
import signal
import stat
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from bitbuilder.hostshim.errors import HostError, MachineError
from bitbuilder.hostshim.paths import checked_name

NSPAWN = "systemd-nspawn"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_RESERVED_ENV = ("SYSTEMD_", "NOTIFY_SOCKET", "LISTEN_", "container")
_HOST_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_UNSAFE_PATH = re.compile(r"[\x00-\x1f\x7f:,\\]")
_IFNAME = re.compile(r"^[a-z0-9]{1,15}$")
MAX_ENV_VALUE = 4096
# How many user namespaces may exist: 0 (or no such file: a kernel without them) means none,
# and every machine runs in its own (--private-users=pick).
MAX_USER_NAMESPACES = Path("/proc/sys/user/max_user_namespaces")


class InitKind(StrEnum):
    systemd = "systemd"
    other = "other"  # busybox init and friends: SIGUSR2 is their poweroff

    @property
    def kill_signal(self) -> str:
        return "SIGRTMIN+3" if self is InitKind.systemd else "SIGUSR2"

    @property
    def kill_signo(self) -> int:
        return int(signal.SIGRTMIN) + 3 if self is InitKind.systemd else int(signal.SIGUSR2)


def _lstat_inside(root: Path, rel: str) -> os.stat_result | None:
    """lstat of root/rel without following any symlink on the way (the image's, not ours)."""
    current = root
    parts = rel.split("/")
    for i, part in enumerate(parts):
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return None
        if i < len(parts) - 1 and not stat.S_ISDIR(st.st_mode):
            return None
    return st


def detect_init(rootfs: Path) -> InitKind:
    """systemd if the image carries it as its init, else a SysV-style init such as busybox."""
    for rel in ("usr/lib/systemd/systemd", "lib/systemd/systemd"):
        st = _lstat_inside(rootfs, rel)
        if st is not None and stat.S_ISREG(st.st_mode):
            return InitKind.systemd
    st = _lstat_inside(rootfs, "sbin/init")
    if (
        st is not None
        and stat.S_ISLNK(st.st_mode)
        and "systemd" in os.readlink(rootfs / "sbin/init")
    ):
        return InitKind.systemd
    return InitKind.other


def check_user_namespaces() -> None:
    """Refuse a start that nspawn would fail obscurely: the host allows no user namespaces."""
    try:
        allowed = int(MAX_USER_NAMESPACES.read_text().strip() or "0")
    except FileNotFoundError:
        raise HostError(
            "this kernel has no user namespaces (no /proc/sys/user/max_user_namespaces): every "
            "machine runs in its own, so boot a kernel built with CONFIG_USER_NS=y",
            reason="UserNamespacesDisabled",
        ) from None
    if allowed <= 0:
        raise HostError(
            f"user namespaces are disabled on this host (user.max_user_namespaces = {allowed}): "
            "every machine runs in its own, so set it higher (sysctl -w "
            "user.max_user_namespaces=65536, and in /etc/sysctl.d to keep it)",
            reason="UserNamespacesDisabled",
        )


def check_hostname(value: str) -> str:
    labels = value.split(".")
    if len(value) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise MachineError(f"invalid hostname {value!r}", reason="InvalidSettings")
    return value


def check_environment(env: dict[str, str]) -> dict[str, str]:
    for name, value in env.items():
        if not _ENV_NAME.fullmatch(name) or name.startswith(_RESERVED_ENV):
            raise MachineError(f"invalid environment name {name!r}", reason="InvalidSettings")
        if len(value) > MAX_ENV_VALUE or any(ord(c) < 0x20 or c == "\x7f" for c in value):
            raise MachineError(
                f"environment value of {name} has control characters or is too long",
                reason="InvalidSettings",
            )
    return env


def check_ifname(value: str) -> str:
    if not _IFNAME.fullmatch(value):
        raise MachineError(f"invalid interface name {value!r}", reason="InvalidSettings")
    return value


def check_path(path: Path) -> str:
    text = str(path)
    if not path.is_absolute() or _UNSAFE_PATH.search(text) or "/../" in f"{text}/":
        raise MachineError(f"path {text!r} cannot be passed to nspawn", reason="InvalidPath")
    return text


@dataclass(frozen=True)
class NspawnMachine:
    name: str
    root: Path  # the machine's root: an overlay of the image and its writable layer
    veth: tuple[str, str] | None  # (host, machine) names of the veth pair; None = loopback only
    init: InitKind
    etc_layers: tuple[Path, ...] = ()  # each an etc/ tree, lowest first
    usr_layers: tuple[Path, ...] = ()  # each a usr/ tree, lowest first
    hostname: str | None = None
    environment: dict[str, str] = field(default_factory=dict)
    # (host dir, dir inside): bound read-only and idmapped, so the machine sees the files of
    # host root as its own root's (not as nobody); layers below a host dir are taken from
    # the bound copy inside.
    idmapped: tuple[tuple[Path, str], ...] = ()


def _layer(path: Path, idmapped: tuple[tuple[Path, str], ...]) -> str:
    for host, inside in idmapped:
        if path == host or host in path.parents:
            return "+" + check_path(Path(inside) / path.relative_to(host))
    return check_path(path)


def _overlay(
    layers: tuple[Path, ...], target: str, idmapped: tuple[tuple[Path, str], ...]
) -> list[str]:
    if not layers:
        return []
    lowers = ":".join(_layer(p, idmapped) for p in layers)
    return [f"--overlay-ro=+{target}:{lowers}:{target}"]


def nspawn_argv(machine: NspawnMachine) -> list[str]:
    """The full command line that boots `machine`."""
    name = checked_name(machine.name)
    argv = [
        NSPAWN,
        "--quiet",
        "--register=no",
        "--keep-unit",
        "--boot",
        f"--directory={check_path(machine.root)}",
        f"--machine={name}",
        "--private-users=pick",
        "--private-users-ownership=auto",
        f"--kill-signal={machine.init.kill_signal}",
        "--console=read-only",
        "--link-journal=no",
        "--resolv-conf=off",
        "--timezone=off",
    ]
    if machine.veth is None:
        argv.append("--private-network")
    else:
        host, inside = (check_ifname(n) for n in machine.veth)
        argv.append(f"--network-veth-extra={host}:{inside}")
    if machine.hostname is not None:
        argv.append(f"--hostname={check_hostname(machine.hostname)}")
    for key, value in sorted(check_environment(machine.environment).items()):
        argv.append(f"--setenv={key}={value}")
    # nspawn mounts by destination, so these binds (under /.bitbuilder) come before the
    # overlays over /etc and /usr that read from them.
    for source, dest in machine.idmapped:
        argv.append(f"--bind-ro={check_path(source)}:{check_path(Path(dest))}:norbind,idmap")
    argv += _overlay(machine.etc_layers, "/etc", machine.idmapped)
    argv += _overlay(machine.usr_layers, "/usr", machine.idmapped)
    return argv


# --- the running machine, as /proc shows it ------------------------------------------------


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(c) for c in text.split()]


def find_leader(nspawn_pid: int) -> int | None:
    """The child of nspawn in another pid namespace that has exec'd the machine's init.

    (nspawn renames its helper processes, so only the executable tells init apart.)"""
    try:
        own_ns = os.readlink(f"/proc/{nspawn_pid}/ns/pid")
        own_exe = os.readlink(f"/proc/{nspawn_pid}/exe")
        for child in _children(nspawn_pid):
            if os.readlink(f"/proc/{child}/ns/pid") == own_ns:
                continue
            if os.readlink(f"/proc/{child}/exe") != own_exe:
                return child
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def accepts(pid: int, signo: int) -> bool:
    """Will `pid` take `signo`? PID 1 of a namespace drops any signal it neither catches nor
    blocks (systemd blocks and reads a signalfd; busybox init waits in sigtimedwait), so a
    stop request sent before that would be lost."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        waiting = Path(f"/proc/{pid}/wchan").read_text()
    except FileNotFoundError:
        return False
    masks = dict(line.split(":\t", 1) for line in status.splitlines() if line.startswith("Sig"))
    taken = int(masks["SigCgt"], 16) | int(masks["SigBlk"], 16)
    return bool(taken >> (signo - 1) & 1) or "sigtimedwait" in waiting


def _all_ended(pid: int) -> bool:
    """Every descendant of `pid` has exited (zombies not reaped yet count as ended)."""
    for child in _children(pid):
        try:
            state = Path(f"/proc/{child}/stat").read_text().rpartition(")")[2].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if state not in ("Z", "X") or not _all_ended(child):
            return False
    return True


def shut_down(leader: int) -> bool:
    """A busybox-style init past its poweroff work: its handlers reset (it took the signal),
    the shutdown actions done, SIGTERM sent to all and all ended; what it does next is sleep
    1 s before its SIGKILL to all and 1 s before the poweroff, with nothing left to wait for.
    True too once it is gone."""
    try:
        status = Path(f"/proc/{leader}/status").read_text()
        waiting = Path(f"/proc/{leader}/wchan").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    masks = dict(line.split(":\t", 1) for line in status.splitlines() if line.startswith("Sig"))
    handled = int(masks["SigCgt"], 16) | int(masks["SigBlk"], 16)
    return handled == 0 and "nanosleep" in waiting and _all_ended(leader)


def init_ready(nspawn_pid: int, init: InitKind) -> int | None:
    """The machine's init once it has exec'd and can be powered off, else None."""
    leader = find_leader(nspawn_pid)
    return leader if leader is not None and accepts(leader, init.kill_signo) else None
