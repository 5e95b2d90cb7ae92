"""Per-machine cgroups for the direct executor: limits, membership, kill-all, removal.

cgroup2 first: on a unified host one directory carries memory.max, cpu.max and pids.max. On a
hybrid host (v1 controllers, cgroup2 at /sys/fs/cgroup/unified without controllers) the limits
go to the v1 memory/cpu/pids hierarchies and the cgroup2 directory is still used to find and
kill every process of the machine (cgroup.kill). The machine's first process is written into
every directory before it execs nspawn, so nothing the machine starts escapes its limits.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from bitbuilder.hostshim.api import ResourceLimits
from bitbuilder.hostshim.errors import HostError, MachineError

CGROUP_ROOT = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000
V1_CONTROLLERS = ("memory", "cpu", "pids", "systemd")  # "systemd" = the name=systemd hierarchy
_V2_CONTROLLERS = ("memory", "cpu", "pids")
# The tasks limit of a machine whose spec sets none (where the pids controller exists): a fork
# bomb in one machine must not exhaust the host's pids. (systemd's DefaultTasksMax does the same
# for the systemd executor.)
DEFAULT_TASKS = 16384


def _unified_root() -> Path | None:
    for candidate in (CGROUP_ROOT, CGROUP_ROOT / "unified"):
        if (candidate / "cgroup.procs").is_file() and (candidate / "cgroup.controllers").exists():
            return candidate
    return None


def _own_v1_path(controller: str) -> str:
    """This process's cgroup in a v1 hierarchy (machines nest below it, inside its limits)."""
    key = "name=systemd" if controller == "systemd" else controller
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if key in controllers.split(","):
            return path.lstrip("/")
    return ""


def signal_pid(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _host_error(exc: OSError, path: Path) -> MachineError:
    """A cgroup file system the shim cannot change, as the host setting to fix."""
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return HostError(
            f"the cgroup file system is not writable at {path} ({exc.strerror}): run the shim "
            f"on the host, or in a container that delegates a writable cgroup tree to it (a "
            f"container sharing the host's cgroups gets {CGROUP_ROOT} read-only)",
            reason="CgroupsReadOnly",
        )
    if exc.errno == errno.ENOENT:
        return HostError(
            f"no cgroup hierarchy at {path.parent}: mount the cgroup file systems "
            f"(cgroup2 at {CGROUP_ROOT}, as systemd does at boot)",
            reason="CgroupsMissing",
        )
    return MachineError(f"cannot change cgroup {path}: {exc.strerror}")


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise _host_error(exc, path) from exc


@dataclass(frozen=True)
class MachineCgroups:
    """The directories one machine's processes live in; `unified` finds and kills them all."""

    unified: Path
    v1: tuple[Path, ...]

    @property
    def dirs(self) -> tuple[Path, ...]:
        return (self.unified, *self.v1)

    def to_json(self) -> dict[str, object]:
        return {"unified": str(self.unified), "v1": [str(p) for p in self.v1]}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> MachineCgroups:
        v1 = data.get("v1", [])
        assert isinstance(v1, list)
        return cls(unified=Path(str(data["unified"])), v1=tuple(Path(str(p)) for p in v1))

    def procs_files(self) -> list[Path]:
        return [d / "cgroup.procs" for d in self.dirs]

    def pids(self) -> set[int]:
        found: set[int] = set()
        for sub, _dirs, _files in os.walk(self.unified):
            try:
                found.update(int(p) for p in Path(sub, "cgroup.procs").read_text().split())
            except FileNotFoundError:
                continue
        return found

    def kill_all(self) -> None:
        kill_file = self.unified / "cgroup.kill"
        if kill_file.exists():
            _write(kill_file, "1")
            return
        for pid in self.pids():
            signal_pid(pid, signal.SIGKILL)

    def remove(self) -> None:
        """rmdir every directory bottom-up (nspawn adds its own below ours), then the shim's
        group above them if no other machine is left in it; missing is fine."""
        for top in self.dirs:
            for sub, _dirs, _files in sorted(os.walk(top), key=lambda e: -len(e[0])):
                _rmdir(Path(sub))
            _rmdir(top.parent, busy_ok=True)


def _mkdir(path: Path) -> None:
    """mkdir -p, again if a concurrent stop removed the (then empty) shim group meanwhile."""
    for _ in range(3):
        try:
            path.mkdir(parents=True, exist_ok=True)
            return
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise _host_error(exc, path) from exc
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _host_error(exc, path) from exc


def _rmdir(path: Path, busy_ok: bool = False) -> None:
    try:
        path.rmdir()
    except OSError as exc:
        if exc.errno == errno.ENOENT or (busy_ok and exc.errno in (errno.EBUSY, errno.ENOTEMPTY)):
            return
        raise MachineError(f"cannot remove cgroup {path}: {exc.strerror}") from exc


def _v2_limits(d: Path, limits: ResourceLimits, have: set[str]) -> None:
    if limits.memory_bytes is not None and "memory" in have:
        _write(d / "memory.max", str(limits.memory_bytes))
        if (d / "memory.swap.max").exists():
            _write(d / "memory.swap.max", "0")
    if limits.cpu_millis is not None and "cpu" in have:
        _write(d / "cpu.max", f"{limits.cpu_millis * CPU_PERIOD_US // 1000} {CPU_PERIOD_US}")
    if limits.tasks is not None and "pids" in have:
        _write(d / "pids.max", str(limits.tasks))


def _v1_limits(dirs: dict[str, Path], limits: ResourceLimits) -> None:
    if limits.memory_bytes is not None and "memory" in dirs:
        _write(dirs["memory"] / "memory.limit_in_bytes", str(limits.memory_bytes))
        memsw = dirs["memory"] / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            _write(memsw, str(limits.memory_bytes))
    if limits.cpu_millis is not None and "cpu" in dirs:
        _write(dirs["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
        _write(dirs["cpu"] / "cpu.cfs_quota_us", str(limits.cpu_millis * CPU_PERIOD_US // 1000))
    if limits.tasks is not None and "pids" in dirs:
        _write(dirs["pids"] / "pids.max", str(limits.tasks))


def _enable_controllers(root: Path, parent: Path, wanted: Iterable[str]) -> set[str]:
    available = set((root / "cgroup.controllers").read_text().split())
    enabled = {c for c in wanted if c in available}
    for d in (root, parent):
        for c in enabled:
            _write(d / "cgroup.subtree_control", f"+{c}")
    return enabled


def _require(limits: ResourceLimits, have: set[str]) -> None:
    needed = {"memory": limits.memory_bytes, "cpu": limits.cpu_millis, "pids": limits.tasks}
    missing = sorted(c for c, v in needed.items() if v is not None and c not in have)
    if missing:
        raise HostError(
            f"this host cannot enforce the {', '.join(missing)} limit: no such cgroup "
            f"controller under {CGROUP_ROOT}. Enable it (cgroup2: boot with "
            "systemd.unified_cgroup_hierarchy=1, and cgroup_enable=memory where the kernel "
            "needs it), or drop that limit from the spec's resources",
            reason="LimitUnsupported",
        )


def _v1_dirs(scope: str, name: str, v2: set[str]) -> dict[str, Path]:
    """The machine's directory in each v1 hierarchy whose controller cgroup2 does not carry."""
    dirs = {}
    for controller in V1_CONTROLLERS:
        base = CGROUP_ROOT / controller
        if controller not in v2 and (base / "cgroup.procs").is_file():
            dirs[controller] = base / _own_v1_path(controller) / f"bitbuilder-{scope}" / name
    return dirs


def machine_cgroups(scope: str, name: str) -> MachineCgroups | None:
    """Where the machine's cgroups are (or would be), from the names alone: a stop finds the
    processes of a start whose record a crash lost. None without cgroup2."""
    root = _unified_root()
    if root is None:
        return None
    v2 = set((root / "cgroup.controllers").read_text().split()) & set(_V2_CONTROLLERS)
    unified = root / f"bitbuilder-{scope}" / name
    return MachineCgroups(unified=unified, v1=tuple(_v1_dirs(scope, name, v2).values()))


def create_cgroups(
    scope: str, name: str, limits: ResourceLimits, default_memory: int | None = None
) -> MachineCgroups:
    """Create (or reuse) the machine's cgroups under `bitbuilder-<scope>` and set its limits.

    Limits the spec leaves unset get the shim's defaults (tasks, and `default_memory`) where
    the host has their controller; a limit the spec sets is refused where it has not."""
    root = _unified_root()
    if root is None:
        raise HostError(
            f"no cgroup2 hierarchy at {CGROUP_ROOT} or {CGROUP_ROOT / 'unified'}: mount one "
            f"(mount -t cgroup2 none {CGROUP_ROOT}) or boot with systemd's default cgroup "
            "layout; the shim finds and stops every process of a machine through it",
            reason="CgroupsMissing",
        )
    group = f"bitbuilder-{scope}"
    unified = root / group / name
    _mkdir(unified)
    v2 = _enable_controllers(root, root / group, _V2_CONTROLLERS)
    v1 = _v1_dirs(scope, name, v2)
    for path in v1.values():
        _mkdir(path)
    cgroups = MachineCgroups(unified=unified, v1=tuple(v1.values()))
    have = v2 | set(v1)
    if limits.tasks is None and "pids" in have:
        limits = limits.model_copy(update={"tasks": DEFAULT_TASKS})
    if limits.memory_bytes is None and "memory" in have:
        limits = limits.model_copy(update={"memory_bytes": default_memory})
    try:
        _require(limits, have)
        _v2_limits(unified, limits, v2)
        _v1_limits(v1, limits)
    except MachineError:
        cgroups.remove()
        raise
    return cgroups
