"""Where a start or an update spends its time: each phase is logged at DEBUG as it ends.

A line reads `tenant NAME: phase PHASE took N.N ms`; the benchmarks (tests/bench) read these
lines from the shim's log to print a per-phase breakdown, and on a host `--log-level debug`
shows them. Not enabled, a phase costs one level check.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


@contextmanager
def phase(tenant: str, name: str) -> Iterator[None]:
    began = time.perf_counter()
    try:
        yield
    finally:
        if log.isEnabledFor(logging.DEBUG):
            ms = (time.perf_counter() - began) * 1000
            log.debug("tenant %s: phase %s took %.1f ms", tenant, name, ms)
