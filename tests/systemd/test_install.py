"""The installer writes the shipped units, the networkd file and a generator that runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bitbuilder.hostshim.systemd import install, networkd
from tests.systemd.states import save, wanted


def run_install(tmp_path: Path) -> list[Path]:
    return install.install(
        tmp_path / "units", tmp_path / "gen", tmp_path / "bin", tmp_path / "net", tmp_path / "st"
    )


def test_units_networkd_file_and_generator_are_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(install, "SYSTEMD_EXEC_PATH", (str(tmp_path / "nowhere"),))
    written = run_install(tmp_path)
    for unit in install.UNITS:
        assert (tmp_path / "units" / unit).read_text() == install.shipped_unit(unit)
    assert (tmp_path / "net" / networkd.NETWORK_FILE).read_text() == networkd.render()
    generator = tmp_path / "gen" / install.GENERATOR_NAME
    assert generator.stat().st_mode & 0o111
    # Not on systemd's search path here: the entry points are linked into --bin-dir.
    for command in install.ENTRY_POINTS:
        link = tmp_path / "bin" / command
        assert link.readlink() == Path(sys.prefix) / "bin" / command
        assert link in written
    assert run_install(tmp_path) == written  # idempotent


def test_the_installed_generator_runs_with_the_baked_in_state_dir(tmp_path: Path) -> None:
    run_install(tmp_path)
    save(tmp_path / "st", "web", running=True)
    normal = tmp_path / "normal"
    result = subprocess.run(
        [str(tmp_path / "gen" / install.GENERATOR_NAME), str(normal), "/x", "/y"],
        capture_output=True,
        text=True,
        env={},  # generators run with an almost empty environment
    )
    assert result.returncode == 0, result.stderr
    assert wanted(normal) == ["setup-tenant@web.service"]


def test_entry_points_already_on_the_search_path_are_not_linked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = tmp_path / "usr-bin"
    found.mkdir()
    for command in install.ENTRY_POINTS:
        (found / command).write_text("#!/bin/sh\n")
        (found / command).chmod(0o755)
    monkeypatch.setattr(install, "SYSTEMD_EXEC_PATH", (str(found),))
    assert install.link_entry_points(tmp_path / "bin") == []
    assert not (tmp_path / "bin").exists()


def test_a_generator_that_cannot_import_the_project_says_so(tmp_path: Path) -> None:
    """Run by an interpreter without the package (as after an upgrade removed it): it fails
    loudly, naming the cure, instead of restoring nothing in silence."""
    run_install(tmp_path)
    bare = Path("/usr/bin/python3")
    if not bare.exists() or subprocess.run([bare, "-I", "-c", "import bitbuilder"]).returncode == 0:
        pytest.skip("needs a python3 without the bitbuilder package")
    result = subprocess.run(
        [
            bare,
            "-I",
            str(tmp_path / "gen" / install.GENERATOR_NAME),
            str(tmp_path / "n"),
            "/x",
            "/y",
        ],
        capture_output=True,
        text=True,
        env={},
    )
    assert result.returncode == 1
    assert "cannot import bitbuilder" in result.stderr
    assert "no tenant is restored at this boot" in result.stderr
    assert "bitbuilder-hostshim-install" in result.stderr
    assert not (tmp_path / "n").exists()
