"""Fixtures of more than one area (an area's own live in its conftest.py)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import settings

from tests.helpers.rootfs import cached_busybox_rootfs

# A failing property test prints the @reproduce_failure blob beside the seed below. No
# deadline: on a loaded 2-core CI machine one slow example is not a failure (speed is the
# benchmarks' job, not the tests').
settings.register_profile("bitbuilder", print_blob=True, deadline=None)
settings.load_profile("bitbuilder")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Every run has a known hypothesis seed (random unless given), so a failure can be replayed."""
    if config.getoption("hypothesis_seed", None) is None:
        config.option.hypothesis_seed = str(random.SystemRandom().randrange(2**32))


def pytest_report_header(config: pytest.Config) -> str:
    seed = config.getoption("hypothesis_seed")
    return f"hypothesis seed: {seed} (replay a run with: --hypothesis-seed={seed})"


@pytest.fixture(scope="session")
def busybox_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The busybox test image, built once per session for every area that boots machines."""
    return cached_busybox_rootfs(tmp_path_factory.getbasetemp() / "rootfs-cache")
