"""The e2e suite (tests/e2e), run against the emulated API: proof that it works, short of a
real cluster. With the operator and a real host shim, its Tenant-Ready test runs too
(test_real_shim.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.kube_emulator import EmulatorThread

ROOT = Path(__file__).resolve().parents[2]


def run_e2e(api: EmulatorThread, tmp_path: Path, **env: str) -> str:
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/e2e", "-q", "-rs", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env={**os.environ, "KUBECONFIG": str(kubeconfig), **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_the_e2e_suite_passes_against_the_emulator(api: EmulatorThread, tmp_path: Path) -> None:
    out = run_e2e(api, tmp_path, BITBUILDER_E2E_REPO="")
    assert "3 passed, 1 skipped" in out, out
