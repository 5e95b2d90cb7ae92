"""30 concurrent PUTs, then 30 concurrent DELETEs; then the same while the shim is killed at a
random moment and restarted, the callers retrying as the operator does. No reply is a 5xx,
every tenant ends up running exactly once, and after the deletes nothing is left."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tests.faults.conftest import FAULTS, FaultHost
from tests.shim.harness import Reply

pytestmark = FAULTS

NAMES = [f"t{i:02d}" for i in range(30)]


def _network(name: str) -> dict[str, str]:
    """Every third tenant on its own link (links and nft elements to leave behind), the rest
    loopback only (cheaper on a 2-core CI host)."""
    return {"mode": "isolated" if int(name[1:]) % 3 == 0 else "none"}


def _all(host: FaultHost, call: Callable[[str], Reply | None]) -> dict[str, Reply | None]:
    with ThreadPoolExecutor(max_workers=len(NAMES)) as pool:
        return dict(zip(NAMES, pool.map(call, NAMES), strict=True))


class Callers:
    """The 30 callers; a request the kill cuts off yields None (the caller retries later)."""

    def __init__(self, host: FaultHost) -> None:
        self.host = host
        self.url = host.git.url("shared.git")
        self.replies: list[Reply] = []

    def put(self, name: str) -> Reply | None:
        source = {"url": self.url, "ref": {"branch": "main"}}
        return self._call(lambda: self.host.put(name, source=source, network=_network(name)))

    def delete(self, name: str) -> Reply | None:
        return self._call(lambda: self.host.delete(name))

    def _call(self, request: Callable[[], Reply]) -> Reply | None:
        try:
            reply = request()
        except OSError:
            return None  # the shim died under it, or was not up yet
        self.replies.append(reply)
        return reply

    def no_5xx(self) -> None:
        bad = [(r.status, r.body) for r in self.replies if r.status >= 500]
        assert not bad, bad


def _kill_meanwhile(host: FaultHost, work: Callable[[], Any], after: float) -> None:
    """Run `work` (the 30 requests) and kill -9 the shim `after` seconds in; restart it."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(work)
        deadline = time.monotonic() + after
        while time.monotonic() < deadline and not running.done():
            time.sleep(0.01)  # the random moment itself: this is the fault, not a wait
        host.kill_shim()
        running.result()
    host.start_shim()


def _assert_all_running(host: FaultHost, replies: dict[str, Reply | None]) -> None:
    for name, reply in replies.items():
        assert reply is not None and reply.status == 200, (name, reply)
        assert reply.body["phase"] == "Running", reply.body
        host.one_machine(name)


def test_concurrent_puts_and_deletes_with_the_shim_killed(fault_host: FaultHost) -> None:
    host = fault_host
    host.repo("shared")
    callers = Callers(host)
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    print(f"kill moments from seed {seed}")  # shown with a failure: the moments to replay

    began = time.monotonic()
    _assert_all_running(host, _all(host, callers.put))
    put_time = time.monotonic() - began
    began = time.monotonic()
    deleted = _all(host, callers.delete)
    delete_time = time.monotonic() - began
    assert all(r is not None and r.status == 200 for r in deleted.values()), deleted
    assert host.leftovers() == []

    for _ in range(2):
        kill_at = rng.uniform(0, put_time)
        _kill_meanwhile(host, lambda: _all(host, callers.put), kill_at)
        _assert_all_running(host, _all(host, callers.put))  # the callers retry
        kill_at = rng.uniform(0, delete_time)
        _kill_meanwhile(host, lambda: _all(host, callers.delete), kill_at)
        again = _all(host, callers.delete)
        assert all(r is not None and r.status in (200, 404) for r in again.values()), again
        assert host.client.request("GET", "/v1/machines").body == {"items": []}
        assert host.leftovers() == []
    callers.no_5xx()
