"""Soak: many tenants, a commit each every few seconds, for minutes (run as root; not pytest):

    /opt/bb-venv/bin/python -m tests.bench.bench_soak [--minutes 10] [--tenants 10] [--every 5]

Standalone mode on real parts (the `bitbuilder-hostshim` process, `bitbuilder run` polling each
tenant repo every second, git daemon, nspawn machines). Each tenant's repo gets a new commit
every `--every` seconds (staggered), and the benchmark watches each tenant's applied revision.
Prints the updates done (a pushed commit seen Running), those a newer commit overtook first,
failures (a tenant seen Failed, or not at its last commit once the pushes stop), the commit ->
Running latency, and the shim's and the reconciler's RSS and open fds at start and end (a leak
shows as growth). Everything runs under a temp dir that is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tests.bench.host import bench_host
from tests.standalone.conftest import Host, motd, tenant_manifest


@dataclass
class Tenant:
    name: str
    pushed: str = ""  # the last commit pushed
    pushed_at: float = 0.0
    seen: bool = True  # the last commit was seen Running
    failed: set[str] = field(default_factory=set)  # commits seen Failed


@dataclass
class Tally:
    pushed: int = 0
    done: int = 0
    overtaken: int = 0
    latencies: list[float] = field(default_factory=list)


def usage(pid: int) -> tuple[int, list[str]]:
    """(RSS in KiB, what its open fds point at) of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    fds = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            fds.append(os.readlink(fd).split(":")[0])  # socket:[123] -> socket
        except FileNotFoundError:
            continue  # closed meanwhile
    return rss, sorted(fds)


def pids(host: Host) -> dict[str, int]:
    return {name: proc.pid for name, proc in host.procs.children if name != "git-daemon"}


def observe(host: Host, tenants: list[Tenant], tally: Tally) -> None:
    """One look at every tenant's status in `bitbuilder run`'s state."""
    now = time.monotonic()
    for tenant in tenants:
        if not tenant.seen and host.applied(tenant.name) == tenant.pushed:
            tenant.seen = True
            tally.done += 1
            tally.latencies.append(now - tenant.pushed_at)
        if host.phase(tenant.name) == "Failed":
            tenant.failed.add(tenant.pushed)


def soak(host: Host, tenants: list[Tenant], seconds: float, every: float) -> Tally:
    tally = Tally()
    started = time.monotonic()
    step = every / len(tenants)  # staggered: one push every `step` seconds, round robin
    turn = 0
    while time.monotonic() < started + seconds:
        tenant = tenants[turn % len(tenants)]
        if not tenant.seen:
            tally.overtaken += 1
        tenant.pushed = host.repos[tenant.name].commit(motd(f"{tenant.name} {turn}"), f"{turn}")
        tenant.pushed_at, tenant.seen = time.monotonic(), False
        tally.pushed += 1
        turn += 1
        next_push = started + turn * step
        while time.monotonic() < next_push:
            observe(host, tenants, tally)
            time.sleep(min(0.2, max(0.0, next_push - time.monotonic())))  # pacing, not sync
        host.procs.check()
    return tally


def drain(host: Host, tenants: list[Tenant], tally: Tally, timeout: float = 120) -> list[str]:
    """After the last push: until every tenant runs its last commit; the ones that did not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(t.seen for t in tenants):
        observe(host, tenants, tally)
        time.sleep(0.2)
    return [t.name for t in tenants if not t.seen]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to push commits")
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--every", type=float, default=5.0, help="seconds between one tenant's commits")  # fmt: skip
    args = parser.parse_args()
    with bench_host("bench-soak-") as host:
        host.start_shim()
        tenants = [Tenant(f"soak{i:02d}") for i in range(args.tenants)]
        for tenant in tenants:
            tenant.pushed = host.tenant_repo(tenant.name, "start").head()
        host.commit_fleet(
            {f"{t.name}.yaml": tenant_manifest(t.name, host.url(t.name)) for t in tenants}
        )
        host.start_reconciler()
        for tenant in tenants:
            host.wait_applied(tenant.name, tenant.pushed, timeout=300)
        before = {name: usage(pid) for name, pid in pids(host).items()}
        tally = soak(host, tenants, args.minutes * 60, args.every)
        behind = drain(host, tenants, tally)
        after = {name: usage(pid) for name, pid in pids(host).items()}
    failed = sum(len(t.failed) for t in tenants)
    print(
        f"soak: {args.tenants} tenants, a commit each every {args.every:g}s, "
        f"{args.minutes:g} min (standalone, real shim and nspawn)"
    )
    print(
        f"commits pushed {tally.pushed}; updates done {tally.done}; overtaken by a newer "
        f"commit before seen Running {tally.overtaken}"
    )
    print(f"failures: {failed} commits seen Failed; not at the last commit at the end: {behind}")
    if tally.latencies:
        ordered = sorted(tally.latencies)
        p95 = ordered[round(0.95 * (len(ordered) - 1))]
        print(
            f"commit -> Running: p50 {statistics.median(ordered):.2f}s p95 {p95:.2f}s "
            f"max {ordered[-1]:.2f}s"
        )
    for name, (rss, fds) in before.items():
        end_rss, end_fds = after[name]
        more = Counter(end_fds) - Counter(fds)
        print(
            f"{name:<10} RSS {rss / 1024:7.1f} -> {end_rss / 1024:7.1f} MiB; "
            f"fds {len(fds)} -> {len(end_fds)}" + (f" (more: {dict(more)})" if more else "")
        )


if __name__ == "__main__":
    main()
