"""Benchmark of the host shim (run as root; not part of the pytest run):

    /opt/bb-venv/bin/python -m tests.bench.bench_shim [--tenants 50] [--repeat 5]

Prints: a bare `systemd-nspawn` start of the busybox rootfs (start to exit of /bin/true, the
floor), a bare `systemd-nspawn --boot` with the runner's isolation flags (fresh copy: its first
boot shifts uids, like a new tenant's), PUT -> Running for one tenant through the shim (first
create with clone + checkout, an update to a new commit, and a no-change poll) with their
ratio to the bare boot and the per-phase breakdown of one create and one update, and the time
to bring up N tenants at once. Everything runs under a temp dir that is removed at the end,
machines included.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.bench.bench_runner import SAME_ISOLATION, bare_start
from tests.bench.phases import last_apply, parse, recording, table
from tests.helpers.gitserve import TenantRepo
from tests.helpers.rootfs import cached_busybox_rootfs
from tests.shim.conftest import RealShim, real_config


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bare_nspawn(rootfs: Path) -> None:
    subprocess.run(
        ["systemd-nspawn", "--register=no", "--keep-unit", "-q", "--read-only",
         "--private-network", "-D", str(rootfs), "/bin/true"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip


def spec(name: str, repo: TenantRepo, network: str) -> dict[str, Any]:
    return {
        "name": name,
        "image": "busybox",
        "source": {"url": repo.file_url(), "ref": {"branch": "main"}},
        "network": {"mode": network},
    }


def put_running(shim: RealShim, body: dict[str, Any]) -> dict[str, Any]:
    reply = shim.client.put(body)
    if reply.status != 200 or reply.body.get("phase") != "Running":
        raise RuntimeError(f"{body['name']}: {reply.status} {reply.body}")
    assert isinstance(reply.body, dict)
    return reply.body


def show(label: str, seconds: list[float]) -> None:
    ms = [s * 1000 for s in seconds]
    spread = f" (min {min(ms):.0f}, max {max(ms):.0f}, n={len(ms)})" if len(ms) > 1 else ""
    print(f"{label:<46} {statistics.median(ms):8.0f} ms{spread}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--parallel", type=int, default=8, help="concurrent PUTs for the fleet")
    parser.add_argument("--network", choices=("isolated", "none"), default="isolated")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bb-bench-") as tmp_name:
        tmp = Path(tmp_name)
        rootfs = cached_busybox_rootfs(tmp / "rootfs-cache")
        show(
            "bare systemd-nspawn /bin/true",
            [timed(lambda: bare_nspawn(rootfs)) for _ in range(args.repeat)],
        )
        boots = []
        for i in range(args.repeat):
            copy = tmp / f"bare-{i}"
            shutil.copytree(rootfs, copy, symlinks=True)
            boots.append(bare_start(copy, f"bb-bare-{i}", SAME_ISOLATION))
        show("bare systemd-nspawn --boot, same isolation", boots)

        shim = RealShim(real_config(tmp, trusted_image_paths=(rootfs.parent,))).start()
        try:
            shim.client.request("PUT", "/v1/images/busybox", {"path": str(rootfs)})
            creates, updates, polls = [], [], []
            with recording() as recorder:
                for i in range(args.repeat):
                    repo = TenantRepo(tmp / "served", f"one-{i}.git")
                    repo.commit({"confext/base/etc/motd": "v1\n"})
                    body = spec(f"one-{i}", repo, args.network)
                    creates.append(timed(lambda b=body: put_running(shim, b)))  # type: ignore[misc]
                    create = last_apply(parse(recorder.take(), body["name"]))
                    repo.commit({"confext/base/etc/motd": "v2\n"})
                    updates.append(timed(lambda b=body: put_running(shim, b)))  # type: ignore[misc]
                    update = last_apply(parse(recorder.take(), body["name"]))
                    polls.append(timed(lambda b=body: put_running(shim, b)))  # type: ignore[misc]
                    shim.client.delete(body["name"])
            show("shim PUT -> Running (create: clone+checkout)", creates)
            show("shim PUT -> Running (update to a new commit)", updates)
            show("shim PUT, same spec and head (poll)", polls)
            bare = statistics.median(boots)
            print(f"ratio to the bare boot: create {statistics.median(creates) / bare:.1f}x, "
                  f"update {statistics.median(updates) / bare:.1f}x (target <= 2x)")  # fmt: skip
            print(table("one create, per phase (the last round):", create))
            print(table("one update, per phase (the last round):", update))

            repo = TenantRepo(tmp / "served", "fleet.git")
            repo.commit({"confext/base/etc/motd": "fleet\n"})
            bodies = [spec(f"t{i:03d}", repo, args.network) for i in range(args.tenants)]
            with ThreadPoolExecutor(args.parallel) as pool:
                up = timed(lambda: list(pool.map(lambda b: put_running(shim, b), bodies)))
                listed = shim.client.request("GET", "/v1/machines").body["items"]
                running = sum(1 for item in listed if item["phase"] == "Running")
                deletes: list[int] = []
                down = timed(
                    lambda: deletes.extend(
                        pool.map(lambda b: shim.client.delete(b["name"]).status, bodies)
                    )
                )
            print(f"{args.tenants} tenants up ({args.parallel} concurrent PUTs){'':<9} {up * 1000:8.0f} ms"
                  f"  ({up / args.tenants * 1000:.0f} ms per tenant; {running} Running)")  # fmt: skip
            failed = sum(1 for status in deletes if status != 200)
            print(
                f"{args.tenants} tenants deleted{'':<28} {down * 1000:8.0f} ms  ({failed} failed)"
            )
        finally:
            shim.stop_all()


if __name__ == "__main__":
    main()
