"""The kopf operator, timed (run as root; not part of pytest):

    /opt/bb-venv/bin/python -m tests.bench.bench_operator [--tenants 5] [--commits 10] [--interval 2s]

Through the emulated Kubernetes API (tests/helpers/kube_emulator.py) with the real handlers in
kopf, the real host shim and real nspawn machines (busybox image, tenant repos on git daemon):
  apply    Tenant POSTed -> status Running at its first revision (one tenant at a time)
  poll     commit pushed -> new revision Running, found by the spec.source.interval timer
  request  commit pushed -> new revision Running, after setting the reconcile-requested-at
           annotation (interval 1h, so only the annotation can explain it)
  webhook  commit pushed -> new revision Running, through a signed push to the cluster's
           webhook receiver (kubewebhook.py), which sets that annotation
Prints p50/p95/min/max per path, the shim's share and the phases of the last webhook update. Everything runs under a temp dir that is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from kubernetes import client as k8s

from bitbuilder.operator.demohost import free_port
from bitbuilder.operator.kubewebhook import TenantRequests
from bitbuilder.operator.webhook import start_webhook
from tests.bench.bench_standalone import HOUR, Samples, post_webhook, report
from tests.bench.phases import LogTail
from tests.helpers.gitserve import git_daemon
from tests.helpers.kube_http import TENANTS, Kube
from tests.helpers.rootfs import cached_busybox_rootfs
from tests.helpers.wait import wait_for
from tests.kopf.support import emulated_cluster, operator_thread, request_sync, status_where
from tests.standalone.conftest import WEBHOOK_SECRET, Host, motd, tenant_manifest


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


def commit_samples(
    kube: Kube, host: Host, name: str, commits: int, after_push: Callable[[], None], tail: LogTail
) -> Samples:
    samples = Samples()
    tail.read()
    for i in range(commits):
        started = time.perf_counter()
        commit = host.repos[name].commit(motd(f"{name} {i}"), f"change {i}")
        after_push()
        running_at(kube, name, commit)
        samples.add(time.perf_counter() - started, name, tail)
    return samples


@contextmanager
def webhook_receiver(url: str, secret: Path) -> Iterator[int]:
    """The cluster's push receiver (`bitbuilder webhook`) on loopback, in a thread: its port."""
    port = free_port()
    stop = threading.Event()

    async def serve() -> None:
        api = k8s.ApiClient(k8s.Configuration(host=url))
        runner = await start_webhook(f"127.0.0.1:{port}", secret, TenantRequests(api))
        try:
            while not stop.is_set():
                await asyncio.sleep(0.1)
        finally:
            await runner.cleanup()
            api.close()  # type: ignore[no-untyped-call]

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    try:
        wait_for(lambda: _listening(port), timeout=30, what="the webhook receiver")
        yield port
    finally:
        stop.set()
        thread.join(30)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


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
                host.start_shim("--log-level", "DEBUG")
                tail = LogTail(host.procs.logs / "hostshim.log")
                secret = root / "webhook.secret"
                secret.write_bytes(WEBHOOK_SECRET)
                with (
                    operator_thread(api.url, host.socket),
                    webhook_receiver(api.url, secret) as port,
                ):
                    apply = apply_samples(kube, host, args.tenants)
                    paths = (("poll", args.interval), ("request", HOUR), ("webhook", HOUR))
                    for name, interval in paths:
                        first = host.tenant_repo(name, f"{name} start").head()
                        kube.ok("POST", TENANTS, tenant_manifest(name, host.url(name), interval))
                        running_at(kube, name, first)

                    def request() -> None:
                        request_sync(kube, "request", datetime.now(UTC).isoformat())

                    results = {
                        "poll": commit_samples(
                            kube, host, "poll", args.commits, lambda: None, tail
                        ),
                        "request": commit_samples(
                            kube, host, "request", args.commits, request, tail
                        ),
                        "webhook": commit_samples(
                            kube,
                            host,
                            "webhook",
                            args.commits,
                            lambda: post_webhook(host, port),
                            tail,
                        ),
                    }
                    for name in list(host.repos):
                        kube.ok("DELETE", f"{TENANTS}/{name}")
                    wait_for(lambda: not kube.ok("GET", TENANTS)["items"], timeout=120)
            finally:
                host.teardown()
    print(f"kopf operator, emulated API, real shim + nspawn (poll interval {args.interval})")
    print(report("apply", apply) + "   (Tenant applied -> Running)")
    for path, samples in results.items():
        print(samples.report(path) + "   (commit pushed -> Running)")
    print(results["webhook"].breakdown("the last webhook update, per phase:"))


if __name__ == "__main__":
    main()
