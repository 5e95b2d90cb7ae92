"""machinectl: what machined knows about the tenants (registered by nspawn --register=yes)."""

from __future__ import annotations

import subprocess

from bitbuilder.hostshim.errors import MachineError


def _machinectl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(
            ["machinectl", "--no-pager", *args],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MachineError(f"machinectl failed: {exc}") from exc
    if check and result.returncode != 0:
        raise MachineError(f"machinectl {args[0]} failed: {result.stderr.strip()}")
    return result


def machines() -> list[str]:
    """Names of the registered machines (containers and VMs)."""
    out = _machinectl("list", "--no-legend").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def leader(name: str) -> int | None:
    """PID 1 of the machine as seen from the host, or None if it is not registered."""
    result = _machinectl("show", "--property=Leader", "--value", "--", name, check=False)
    value = result.stdout.strip()
    return int(value) if result.returncode == 0 and value.isdigit() and value != "0" else None
