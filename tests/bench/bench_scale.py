"""Many tenants from one fleet commit, in standalone mode (run as root; not part of pytest):

    python -m tests.bench.bench_scale --tenants 100 [--baseline 10]

Real shim and reconciler (`bitbuilder run` following a fleet repo on git daemon, polled every
500ms), real busybox machines, isolated networks. First --baseline tenants come up and a no-op
PUT (the spec the reconciler sends, unchanged), `GET /v1/machines` (one page of 10, and every
machine in pages) and, as the floor of any call, `GET /healthz` are timed there. Then one
fleet commit brings the total to --tenants: timed until the reconciler reports every one
Running at the tenant repo's commit, with the shim's and the reconciler's RSS sampled
meanwhile; the calls are timed again. Finally one fleet commit removes them all, and the host
is checked for anything of them left (processes, mounts, links, nftables elements and tables,
cgroups, state). The shim logs its phases (DEBUG): the mean of each over the first and the
last tenths of the starts shows what grows with the number of tenants. Everything runs under a
temp dir that is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bitbuilder.hostshim.config import ShimConfig
from bitbuilder.hostshim.machine.cgroups import _unified_root
from bitbuilder.hostshim.machine.executor import shim_scope
from bitbuilder.hostshim.machine.network import filter_entries, link_name
from bitbuilder.operator.api import Tenant
from bitbuilder.operator.shimclient import LIST_PAGE, ShimClient
from bitbuilder.operator.translate import to_machine_spec
from tests.bench.bench_standalone import HOUR
from tests.bench.host import bench_host
from tests.bench.phases import last_apply, parse
from tests.helpers.wait import wait_for
from tests.standalone.conftest import Host, tenant_manifest

SAMPLES = 20
PAGE = 10  # machines per timed list page: the baseline's count, so both lists are alike


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class RssPeak:
    """The highest RSS of some processes, sampled every 200ms in a thread."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak = dict.fromkeys(pids, 0.0)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self.stop.wait(0.2):
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], rss_mib(pid))

    def __enter__(self) -> RssPeak:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def timed_ms(host: Host, call: Callable[[ShimClient], Awaitable[Any]]) -> float:
    """The median of SAMPLES calls, over one connection."""

    async def main() -> float:
        async with ShimClient(host.socket, timeout=60) as client:
            seconds = []
            for _ in range(SAMPLES):
                began = time.perf_counter()
                await call(client)
                seconds.append(time.perf_counter() - began)
            return statistics.median(seconds) * 1000

    return asyncio.run(main())


def all_running(host: Host, names: list[str], commit: str) -> bool:
    host.procs.check()
    return all(host.applied(n) == commit for n in names)


def leftovers(host: Host, names: list[str]) -> list[str]:
    """What of the removed tenants is still on the host."""
    config = ShimConfig(state_dir=host.root / "shim", runtime_dir=host.root / "run")
    scope = shim_scope(config)
    left = []
    links = set(Path("/sys/class/net").iterdir())
    for name in names:
        ifname = link_name(scope, name)
        if Path("/sys/class/net", ifname) in links:
            left.append(f"link {ifname}")
        left += [f"nftables: {entry}" for entry in filter_entries(ifname)]
    cgroups = _unified_root()
    group = cgroups / f"bitbuilder-{scope}" if cgroups else None
    if group is not None and group.is_dir():
        left += [f"cgroup {d}" for d in group.iterdir() if d.is_dir()]
    root = str(host.root)
    left += [f"mount {line.split()[1]}" for line in Path("/proc/mounts").read_text().splitlines()
             if root in line]  # fmt: skip
    for folder in (host.root / "shim" / "tenants", host.root / "run" / "machines"):
        if folder.is_dir():
            left += [f"state {p}" for p in folder.iterdir() if not p.name.startswith(".")]
    left += [f"tenant record {n}" for n in host.state.names()]
    shim_pids = {proc.pid for _, proc in host.procs.children}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in shim_pids:
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "systemd-nspawn" in cmdline and root in cmdline:
            left.append(f"process {proc.name}")
    return left


def phase_growth(lines: list[str], names: list[str]) -> list[str]:
    """Mean ms of each start phase over the first and the last tenth of `names` (in order)."""
    tenth = max(1, len(names) // 10)
    means: list[dict[str, float]] = []
    for group in (names[:tenth], names[-tenth:]):
        sums: dict[str, float] = {}
        for name in group:
            for phase, ms in last_apply(parse(lines, name)):
                sums[phase] = sums.get(phase, 0.0) + ms
        means.append({phase: total / len(group) for phase, total in sums.items()})
    rows = [f"start phases, mean ms: first {tenth} tenants -> last {tenth}"]
    for phase in means[1]:
        rows.append(f"  {phase:<36} {means[0].get(phase, 0.0):8.1f} -> {means[1][phase]:8.1f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--baseline", type=int, default=10, help="tenants of the baseline")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for all")
    args = parser.parse_args()
    with bench_host("bench-scale-") as host:
        rows: list[str] = []
        try:
            host.start_shim("--log-level", "DEBUG")
            commit = host.tenant_repo("many", "many").head()
            names = [f"t{i:03d}" for i in range(args.tenants)]
            manifests = {f"{n}.yaml": tenant_manifest(n, host.url("many"), HOUR) for n in names}
            probe = to_machine_spec(Tenant.model_validate(manifests["t000.yaml"]))

            def measure_calls(count: int) -> tuple[float, float, float]:
                put = timed_ms(host, lambda c: c.apply(probe))
                page = timed_ms(host, lambda c: c.machines_page(PAGE))
                every = timed_ms(host, lambda c: c.machines())
                # The floor of any call at this moment (the machine's load, the shim's own
                # work): what the list's figure would be if it cost nothing.
                floor = timed_ms(host, lambda c: c.healthy())
                rows.append(f"at {count:>4} tenants: no-op PUT {put:7.1f} ms   GET /v1/machines?"
                            f"limit={PAGE} {page:6.1f} ms   all {count} (pages of {LIST_PAGE}) "
                            f"{every:7.1f} ms = {every / count * 1000:5.0f} us each   "
                            f"GET /healthz {floor:5.1f} ms")  # fmt: skip
                return put, page, floor

            base = names[: args.baseline]
            host.commit_fleet({f"{n}.yaml": manifests[f"{n}.yaml"] for n in base})
            host.start_reconciler()
            wait_for(lambda: all_running(host, base, commit), timeout=args.timeout, interval=0.5)
            put10, list10, floor10 = measure_calls(args.baseline)
            pids = {name: proc.pid for name, proc in host.procs.children}
            with RssPeak(pids) as rss:
                began = time.perf_counter()
                host.commit_fleet(manifests)
                wait_for(
                    lambda: all_running(host, names, commit),
                    timeout=args.timeout,
                    interval=0.5,
                    what=f"{args.tenants} tenants Running",
                )
                up = time.perf_counter() - began
            rows.append(f"fleet commit -> {args.tenants} Running ({args.tenants - args.baseline}"
                        f" new): {up:.1f} s")  # fmt: skip
            log = (host.procs.logs / "hostshim.log").read_text(errors="replace")
            rows += phase_growth(log.splitlines(), names[args.baseline :])
            putn, listn, floorn = measure_calls(args.tenants)
            rows.append(f"ratio at {args.tenants} to {args.baseline}: no-op PUT "
                        f"{putn / put10:.1f}x, list page {listn / list10:.1f}x (target <= 2x); "
                        f"/healthz {floorn / floor10:.1f}x")  # fmt: skip
            for name, pid in pids.items():
                rows.append(f"RSS {name:<10} {rss_mib(pid):6.1f} MiB at {args.tenants}, "
                            f"peak {rss.peak[name]:6.1f} MiB while coming up")  # fmt: skip
            began = time.perf_counter()
            host.commit_fleet({}, remove=tuple(manifests))
            wait_for(lambda: not host.state.names(), timeout=args.timeout, interval=0.5,
                     what="every tenant removed")  # fmt: skip
            wait_for(lambda: not host.call(lambda c: c.machines()), timeout=60, interval=0.5)
            rows.append(f"fleet commit removing all -> gone: {time.perf_counter() - began:.1f} s")
            left = leftovers(host, names)
            rows.append(f"left behind after removal: {left[:20] or 'nothing'}")
        finally:
            print("\n".join(rows), flush=True)


if __name__ == "__main__":
    main()
