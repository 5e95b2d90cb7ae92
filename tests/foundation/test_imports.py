"""The source folder operator/ must never shadow the standard library's `operator`."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.foundation.conftest import REPO


def _python(code: str, *flags: str) -> str:
    done = subprocess.run(
        [sys.executable, *flags, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


@pytest.mark.parametrize("flags", [(), ("-S",)], ids=["site", "no-site"])
def test_import_operator_from_the_repo_root_is_the_standard_library(flags: tuple[str]) -> None:
    """`-c` puts the repo root first on sys.path. Without -S, .pth files of site-packages may
    import `operator` before that and hide a shadowing folder; -S shows the plain truth."""
    path = Path(_python("import operator; print(operator.__file__)", *flags))
    assert path.parent == Path(sysconfig.get_paths()["stdlib"])
    assert _python("import operator; print(operator.itemgetter(1)('ab'))", *flags) == "b"


def test_the_packages_import_under_their_own_names() -> None:
    out = _python(
        "import bitbuilder.operator.api as a, bitbuilder.hostshim.api as h; "
        "print(a.__file__, h.__file__)"
    )
    operator_api, hostshim_api = map(Path, out.split())
    assert operator_api == REPO / "operator" / "api.py"
    assert hostshim_api == REPO / "hostshim" / "api.py"


def test_bootstrap_wants_a_mode() -> None:
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "bootstrap")], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    assert "usage: bash scripts/bootstrap demo|test" in done.stderr
