"""Commit pushed -> new revision running, in standalone mode (run as root; not part of pytest):

    /opt/bb-venv/bin/python -m tests.bench.bench_standalone [--commits 20] [--interval 2s]

Three ways a tenant learns about a commit, each measured from `git push` of the tenant repo to
`bitbuilder run` reporting the new revision Running (real shim, real nspawn, git daemon):
  poll     the tenant's own spec.source.interval (--interval)
  request  the standalone equivalent of the reconcile-request annotation: the fleet commits
           `bitbuilder.io/reconcile-requested-at` on the Tenant (fleet polled every 500ms)
  webhook  a signed push webhook (tenant interval 1h, so only the webhook can explain it)
Prints p50/p95/min/max per path, the shim's share of each (its apply, from its timing lines)
and the per-phase breakdown of the last webhook update. Everything runs under a temp dir that
is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from bitbuilder.operator.api import RECONCILE_REQUESTED_ANNOTATION
from bitbuilder.operator.webhook import sign
from tests.bench.host import bench_host
from tests.bench.phases import LogTail, Phases, last_apply, parse, table
from tests.standalone.conftest import WEBHOOK_SECRET, Host, motd, tenant_manifest

HOUR = "1h"


def manifests(host: Host, interval: str, annotation: str | None = None) -> dict[str, object]:
    request = tenant_manifest("request", host.url("request"), HOUR)
    if annotation is not None:
        request["metadata"]["annotations"] = {RECONCILE_REQUESTED_ANNOTATION: annotation}
    return {
        "poll.yaml": tenant_manifest("poll", host.url("poll"), interval),
        "request.yaml": request,
        "webhook.yaml": tenant_manifest("webhook", host.url("webhook"), HOUR),
    }


@dataclass
class Samples:
    """Commit pushed -> Running seen, each with the shim's apply in it and its phases."""

    total: list[float] = field(default_factory=list)
    shim: list[float] = field(default_factory=list)
    last: Phases = field(default_factory=list)

    def add(self, seconds: float, name: str, tail: LogTail) -> None:
        self.total.append(seconds)
        self.last = last_apply(parse(tail.read(), name))
        if self.last:
            self.shim.append(self.last[-1][1] / 1000)

    def report(self, path: str) -> str:
        shim = statistics.median(self.shim) if self.shim else float("nan")
        return f"{report(path, self.total)}  shim apply p50={shim:5.2f}s"

    def breakdown(self, title: str) -> str:
        return table(title, self.last, self.total[-1] * 1000)


def measure(
    host: Host, name: str, commits: int, after_push: Callable[[], None], tail: LogTail
) -> Samples:
    """`commits` pushes to `name`'s repo, each until its revision is seen Running."""
    samples = Samples()
    tail.read()
    for i in range(commits):
        started = time.perf_counter()
        commit = host.repos[name].commit(motd(f"{name} {i}"), f"change {i}")
        after_push()
        host.wait_applied(name, commit, timeout=120, interval=0.01)
        samples.add(time.perf_counter() - started, name, tail)
    return samples


def post_webhook(host: Host, port: int | None = None) -> None:
    body = json.dumps({"repository": {"clone_url": host.url("webhook")}}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port or host.webhook_port}/hook",
        data=body,
        headers={"X-Hub-Signature-256": "sha256=" + sign(WEBHOOK_SECRET, body)},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert reply.status == 202


def report(path: str, samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return (
        f"{path:<8} n={len(samples):<3} p50={statistics.median(ordered):6.2f}s "
        f"p95={p95:6.2f}s min={ordered[0]:6.2f}s max={ordered[-1]:6.2f}s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=20)
    parser.add_argument("--interval", default="2s", help="the poll path's spec.source.interval")
    parser.add_argument("--tenants", type=int, default=10, help="tenants added in one fleet push")
    args = parser.parse_args()
    with bench_host("bench-standalone-") as host:
        host.start_shim("--log-level", "DEBUG")
        tail = LogTail(host.procs.logs / "hostshim.log")
        firsts = {
            n: host.tenant_repo(n, f"{n} start").head() for n in ("poll", "request", "webhook")
        }
        host.commit_fleet(manifests(host, args.interval))
        host.start_reconciler(webhook=True)
        for name, commit in firsts.items():
            host.wait_applied(name, commit, timeout=120)

        def request() -> None:
            stamp = datetime.now(UTC).isoformat()
            host.commit_fleet(manifests(host, args.interval, stamp))

        results = {
            "poll": measure(host, "poll", args.commits, lambda: None, tail),
            "request": measure(host, "request", args.commits, request, tail),
            "webhook": measure(host, "webhook", args.commits, lambda: post_webhook(host), tail),
        }
        fleet_seconds = add_tenants(host, args.tenants, manifests(host, args.interval))
    print(f"commit pushed -> new revision Running (standalone; poll interval {args.interval})")
    for path, samples in results.items():
        print(samples.report(path))
    print(results["webhook"].breakdown("the last webhook update, per phase:"))
    print(f"fleet push adding {args.tenants} tenants -> all Running: {fleet_seconds:.1f}s")


def add_tenants(host: Host, count: int, existing: dict[str, object]) -> float:
    """One fleet commit with `count` more tenants (fleet polled every 500ms): until all run."""
    commit = host.tenant_repo("many", "many").head()
    names = [f"t{i:03d}" for i in range(count)]
    more = {f"{n}.yaml": tenant_manifest(n, host.url("many"), HOUR) for n in names}
    started = time.perf_counter()
    host.commit_fleet({**existing, **more})
    for name in names:
        host.wait_applied(name, commit, timeout=600, interval=0.05)
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
