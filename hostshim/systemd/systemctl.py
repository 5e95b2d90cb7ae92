"""systemctl and systemd-run as the shim uses them: transient units, their state, stopping.

The shim talks to PID 1 through these command-line tools rather than a D-Bus binding: they
are always there where systemd is, need no extra Python dependency, and their exit codes are
stable. Every argument is built here from validated names, never from caller text.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from bitbuilder.hostshim.errors import MachineError

# systemctl's exit status for "no such unit" (LSB "program is not installed").
EXIT_NO_SUCH_UNIT = 5


def _run(
    argv: Sequence[str], timeout: float = 60.0, check: bool = True, ok: Sequence[int] = (0,)
) -> str:
    try:
        result = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MachineError(f"{argv[0]} failed: {exc}") from exc
    if check and result.returncode not in ok:
        detail = (result.stderr or result.stdout).strip()
        raise MachineError(f"{' '.join(argv[:3])} ... failed ({result.returncode}): {detail}")
    return result.stdout


def run_transient(
    unit: str,
    argv: Sequence[str],
    properties: Sequence[str],
    description: str,
    timeout: float = 60.0,
) -> None:
    """Start `argv` as the transient service `unit`; returns once systemd reports it started
    (for Type=notify: once the process said READY=1)."""
    _run(
        [
            "systemd-run",
            "--quiet",
            f"--unit={unit}",
            f"--description={description}",
            *(f"--property={p}" for p in properties),
            "--",
            *argv,
        ],
        timeout=timeout,
    )


def show(unit: str, *properties: str) -> dict[str, str]:
    out = _run(["systemctl", "show", f"--property={','.join(properties)}", "--", unit])
    values = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        values[key] = value
    return values


def stop(unit: str, timeout: float = 60.0) -> None:
    """Stop `unit` and wait for it; a unit that does not exist is already stopped."""
    _run(["systemctl", "stop", "--", unit], timeout=timeout, ok=(0, EXIT_NO_SUCH_UNIT))
    reset_failed(unit)


def reset_failed(unit: str) -> None:
    """Forget a failed run, so the unit name can be used again."""
    _run(["systemctl", "reset-failed", "--", unit], check=False)


def daemon_reload() -> None:
    _run(["systemctl", "daemon-reload"], timeout=120.0)


def active_units(pattern: str) -> list[str]:
    """Names of loaded units matching the glob `pattern` that are active or activating."""
    out = _run(
        [
            "systemctl",
            "list-units",
            "--plain",
            "--no-legend",
            "--all",
            "--state=active,activating,reloading",
            "--",
            pattern,
        ]
    )
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def enable_now(*units: str) -> None:
    _run(["systemctl", "enable", "--now", "--", *units], timeout=120.0)
