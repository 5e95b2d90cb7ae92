"""The kopf operator, timed (run as root; not part of pytest):

    /opt/bb-venv/bin/python -m tests.bench.bench_operator [--tenants 5] [--commits 10] [--interval 2s]

Through the emulated Kubernetes API (tests/helpers/kube_emulator.py) with the real handlers in
kopf, the real host shim and real nspawn machines (busybox image, tenant repos on git daemon):
  apply    Tenant POSTed -> status Running at its first revision (one tenant at a time)
  poll     commit pushed -> new revision Running, found by the spec.source.interval timer
  request  commit pushed -> new revision Running, after setting the reconcile-requested-at
           annotation (interval 1h, so only the annotation can explain it)
Prints p50/p95/min/max per path. Everything runs under a temp dir that is removed at the end.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from tests.bench.bench_standalone import HOUR, report
from tests.helpers.gitserve import git_daemon
from tests.helpers.kube_http import TENANTS, Kube
from tests.helpers.rootfs import cached_busybox_rootfs
from tests.helpers.wait import wait_for
from tests.kopf.support import emulated_cluster, operator_thread, request_sync, status_where
from tests.standalone.conftest import Host, motd, tenant_manifest


def running_at(kube: Kube, name: str, commit: str) -> None:
    wait_for(
        lambda: status_where(kube, name, phase="Running", appliedRevision=f"main@sha1:{commit}"),
        timeout=120,
        interval=0.01,
        what=f"{name} Running at {commit[:7]}",
    )


def apply_samples(kube: Kube, host: Host, count: int) -> list[float]:
    samples = []
    for i in range(count):
        name = f"apply-{i}"
        first = host.tenant_repo(name, f"{name} start").head()
        started = time.perf_counter()
        kube.ok("POST", TENANTS, tenant_manifest(name, host.url(name), HOUR))
        running_at(kube, name, first)
        samples.append(time.perf_counter() - started)
    return samples


def commit_samples(kube: Kube, host: Host, name: str, commits: int, request: bool) -> list[float]:
    samples = []
    for i in range(commits):
        started = time.perf_counter()
        commit = host.repos[name].commit(motd(f"{name} {i}"), f"change {i}")
        if request:
            request_sync(kube, name, datetime.now(UTC).isoformat())
        running_at(kube, name, commit)
        samples.append(time.perf_counter() - started)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=5)
    parser.add_argument("--commits", type=int, default=10)
    parser.add_argument("--interval", default="2s", help="the poll path's spec.source.interval")
    args = parser.parse_args()
    rootfs = cached_busybox_rootfs(Path("/var/tmp/bitbuilder-bench-rootfs"))
    with tempfile.TemporaryDirectory(prefix="bench-operator-") as tmp:
        root = Path(tmp)
        (root / "git").mkdir()
        with git_daemon(root / "git") as server, emulated_cluster() as api:
            host = Host(root, server, rootfs)
            kube = Kube(api.url)
            try:
                host.start_shim()
                with operator_thread(api.url, host.socket):
                    results = {"apply": apply_samples(kube, host, args.tenants)}
                    for name, interval in (("poll", args.interval), ("request", HOUR)):
                        first = host.tenant_repo(name, f"{name} start").head()
                        kube.ok("POST", TENANTS, tenant_manifest(name, host.url(name), interval))
                        running_at(kube, name, first)
                    results["poll"] = commit_samples(kube, host, "poll", args.commits, False)
                    results["request"] = commit_samples(kube, host, "request", args.commits, True)
                    for name in list(host.repos):
                        kube.ok("DELETE", f"{TENANTS}/{name}")
                    wait_for(lambda: not kube.ok("GET", TENANTS)["items"], timeout=120)
            finally:
                host.teardown()
    print(f"kopf operator, emulated API, real shim + nspawn (poll interval {args.interval})")
    print(report("apply", results["apply"]) + "   (Tenant applied -> Running)")
    print(report("poll", results["poll"]) + "   (commit pushed -> Running, interval timer)")
    print(report("request", results["request"]) + "   (commit pushed -> Running, annotation)")


if __name__ == "__main__":
    main()
