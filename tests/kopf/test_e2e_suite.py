"""The e2e suite (tests/e2e), run against the emulated API: proof that it works, short of a
real cluster. With the operator and a real host shim, its Tenant-Ready test runs too
(test_real_shim.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.kube_emulator import EmulatorThread
from tests.kopf.support import run_e2e


@pytest.mark.slow
def test_the_e2e_suite_passes_against_the_emulator(api: EmulatorThread, tmp_path: Path) -> None:
    out = run_e2e(api, tmp_path, BITBUILDER_E2E_REPO="")
    assert "3 passed, 3 skipped" in out, out
