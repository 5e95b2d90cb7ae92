"""Machine start times: a bare `systemd-nspawn --boot` of the busybox rootfs vs Runner.start.

    /opt/bb-venv/bin/python -m tests.bench.bench_runner [--rounds 5] [--tenants 10]

Needs root, systemd-nspawn and nft. "Running" means the machine's init has exec'd and installed its
signal handlers (it can be powered off); for the runner also the time until its web server answers on the machine's
address. Prints medians and extremes over the rounds, then the time to start and to stop
--tenants machines one after another.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from bitbuilder.hostshim.api import MachineSpec
from bitbuilder.hostshim.machine.runtime.nspawn import InitKind, init_ready
from tests.helpers.rootfs import cached_busybox_rootfs
from tests.helpers.wait import wait_for
from tests.runner.conftest import Shim, make_shim

# The isolation the runner gives a machine (runtime/nspawn.py), for a bare boot to compare with.
SAME_ISOLATION = (
    "--private-users=pick", "--private-users-ownership=auto", "--link-journal=no",
    "--resolv-conf=off", "--timezone=off",
)  # fmt: skip


def bare_start(rootfs: Path, name: str, flags: tuple[str, ...] = ()) -> float:
    """Seconds from exec of plain nspawn to its init running (then powered off again)."""
    began = time.monotonic()
    proc = subprocess.Popen(
        ["systemd-nspawn", "--register=no", "--keep-unit", "-q", "--boot", "-D", str(rootfs),
         "-M", name, "--private-network", "--console=read-only", "--kill-signal=SIGUSR2",
         *flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    # polled every millisecond: the poll interval is part of what is measured
    wait_for(lambda: init_ready(proc.pid, InitKind.other), interval=0.001, what="nspawn's init")
    elapsed = time.monotonic() - began
    proc.terminate()
    proc.wait(timeout=30)
    return elapsed


def _answers(address: str | None) -> bool:
    try:
        with urllib.request.urlopen(f"http://{address}:8080/", timeout=1):
            return True
    except OSError:
        return False


def runner_start(shim: Shim, name: str) -> tuple[float, float]:
    """(seconds to Runner.start's return, seconds until the web server answers)."""
    began = time.monotonic()
    machine = shim.runner.start(MachineSpec(name=name, image="busybox"), None)
    started = time.monotonic() - began
    wait_for(lambda: _answers(machine.address), interval=0.001, what="the machine's web server")
    return started, time.monotonic() - began


def _row(label: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (
        f"{label:<44} median {statistics.median(ms):7.1f} ms   "
        f"min {min(ms):7.1f}   max {max(ms):7.1f}   (n={len(ms)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tenants", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-runner-") as tmp:
        root = Path(tmp)
        rootfs = cached_busybox_rootfs(root / "cache")
        bare_root = root / "bare-rootfs"
        shutil.copytree(rootfs, bare_root, symlinks=True)
        shim = make_shim(root / "shim", rootfs)
        bare = [bare_start(bare_root, f"bench-bare-{i}") for i in range(args.rounds)]
        first: list[float] = []
        first_http: list[float] = []
        again: list[float] = []
        again_http: list[float] = []
        for i in range(args.rounds):
            name = f"bench-{i}"
            for starts, answers in ((first, first_http), (again, again_http)):
                started, answered = runner_start(shim, name)
                starts.append(started)
                answers.append(answered)
                shim.runner.stop(name)
        print(_row("bare systemd-nspawn --boot: init running", bare))
        print(_row("Runner.start, first boot (uid shift)", first))
        print(_row("Runner.start, first boot: httpd answers", first_http))
        print(_row("Runner.start, next boot", again))
        print(_row("Runner.start, next boot: httpd answers", again_http))
        names = [f"bench-many-{i}" for i in range(args.tenants)]
        began = time.monotonic()
        for name in names:
            shim.runner.start(MachineSpec(name=name, image="busybox"), None)
        up = time.monotonic() - began
        began = time.monotonic()
        for name in names:
            shim.runner.stop(name)
        down = time.monotonic() - began
        print(f"{args.tenants} tenants one after another: started in {up:.2f} s, "
              f"stopped in {down:.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()
