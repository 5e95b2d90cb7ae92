"""SystemdExecutor: each tenant is a transient service of PID 1, registered with machined.

The runner builds the same `systemd-nspawn` command line for both executors; here it becomes
`bitbuilder-tenant-<name>.service` in machine.slice, started by PID 1 (`systemd-run`), so:
- the tenant outlives the shim (it is PID 1's child, not the shim's);
- nspawn runs with `--register=yes --keep-unit`, like `systemd-nspawn@.service`: machined
  registers that very unit as the machine, so `machinectl list` shows every tenant;
- resource limits are unit properties (MemoryMax=, CPUQuota=, TasksMax=), enforced by the
  unified cgroup hierarchy.
A transient unit does not survive a reboot on purpose: at boot the generator's
`setup-tenant@<name>.service` brings each tenant back at its last applied revision.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from bitbuilder.hostshim.api import ResourceLimits
from bitbuilder.hostshim.errors import MachineError
from bitbuilder.hostshim.paths import checked_name
from bitbuilder.hostshim.systemd import systemctl

UNIT_PREFIX = "bitbuilder-tenant-"
SLICE = "machine.slice"


def unit_name(name: str) -> str:
    return f"{UNIT_PREFIX}{checked_name(name)}.service"


def limit_properties(limits: ResourceLimits) -> list[str]:
    """The spec's limits as unit properties (cgroup v2 names; systemd maps them)."""
    props = []
    if limits.memory_bytes is not None:
        props.append(f"MemoryMax={limits.memory_bytes}")
    if limits.cpu_millis is not None:
        # 1000 millicores = one CPU = CPUQuota=100%; systemd takes whole percents.
        props.append(f"CPUQuota={max(1, limits.cpu_millis // 10)}%")
    if limits.tasks is not None:
        props.append(f"TasksMax={limits.tasks}")
    return props


def registered_argv(name: str, argv: list[str]) -> list[str]:
    """The nspawn command line, registered with machined under the tenant's name.

    `--keep-unit` makes machined take the service itself as the machine's unit instead of
    creating a scope (the direct executor passes --register=no: it has no bus to talk to)."""
    if not argv or Path(argv[0]).name != "systemd-nspawn":
        return argv
    rest = [a for a in argv[1:] if not a.startswith("--register") and a != "--keep-unit"]
    named = any(a in ("-M", "--machine") or a.startswith("--machine=") for a in rest)
    machine = [] if named else [f"--machine={name}"]
    return [argv[0], "--register=yes", "--keep-unit", *machine, *rest]


def environment_properties(env: Mapping[str, str]) -> list[str]:
    """Environment= assignments, quoted: a value may hold spaces (never quotes)."""
    properties = []
    for key, value in sorted(env.items()):
        if '"' in value or "\\" in value or "\n" in value:
            raise MachineError(f"environment value of {key} cannot be passed to systemd-run")
        properties.append(f'Environment="{key}={value}"')
    return properties


def service_type(argv: list[str]) -> str:
    """nspawn says READY=1 once the machine's init runs; a VM's readiness is the runner's to
    find out (vmspawn without a vsock hears nothing from the guest)."""
    return "Type=notify" if Path(argv[0]).name == "systemd-nspawn" else "Type=exec"


class SystemdExecutor:
    """The Executor protocol (see hostshim/machine/executor.py) over systemd units."""

    def __init__(self, stop_timeout: float = 30.0, default_memory: int | None = None) -> None:
        self.stop_timeout = stop_timeout
        self.default_memory = default_memory  # MemoryMax= where the spec sets no memory

    def launch(
        self,
        name: str,
        argv: list[str],
        limits: ResourceLimits,
        log: Path,
        env: Mapping[str, str] | None = None,
    ) -> int:
        unit = unit_name(name)
        # A unit of the same name left failed by an earlier run would make systemd-run refuse.
        systemctl.reset_failed(unit)
        log.parent.mkdir(parents=True, exist_ok=True)
        properties = [
            f"Slice={SLICE}",
            service_type(argv),
            "Delegate=yes",  # the machine's systemd (if any) manages its own subtree
            # SIGTERM to nspawn or vmspawn only: each powers its machine off cleanly.
            "KillMode=mixed",
            f"TimeoutStopSec={int(self.stop_timeout)}",
            f"StandardOutput=append:{log}",
            "StandardError=inherit",
            # No Restart=: a machine's link and filter are set up by the runner around each
            # start, so the shim (its drift check) restarts a dead machine, as with the
            # direct executor. Collected when it ends, so its name can be used again.
            "CollectMode=inactive-or-failed",
            *limit_properties(
                limits.model_copy(update={"memory_bytes": self.default_memory})
                if limits.memory_bytes is None
                else limits
            ),
            *environment_properties(env or {}),
        ]
        systemctl.run_transient(
            unit, registered_argv(name, argv), properties, f"BitBuilder tenant {name}"
        )
        pid = self.pid(name)
        if pid is None:
            raise MachineError(f"tenant {name}: {unit} is not running after start (see {log})")
        return pid

    def terminate(self, name: str, timeout: float) -> None:
        systemctl.stop(unit_name(name), timeout=timeout + 10)

    def pid(self, name: str) -> int | None:
        state = systemctl.show(unit_name(name), "MainPID", "ActiveState")
        pid = int(state.get("MainPID") or 0)
        return pid if pid > 0 and state.get("ActiveState") in ("active", "activating") else None

    def running(self) -> list[str]:
        units = systemctl.active_units(f"{UNIT_PREFIX}*.service")
        return [u.removeprefix(UNIT_PREFIX).removesuffix(".service") for u in units]
