"""The boot-time generator pulls in setup-tenant@ for exactly the tenants that were running."""

from __future__ import annotations

from pathlib import Path

from bitbuilder.hostshim.state.store import Intent
from bitbuilder.hostshim.systemd.generator import generate, main, template_path
from tests.systemd.states import save, wanted


def test_only_running_tenants_are_pulled_into_the_boot(tmp_path: Path) -> None:
    state_dir, normal = tmp_path / "state", tmp_path / "normal"
    save(state_dir, "web", running=True)
    save(state_dir, "db", running=True)
    save(state_dir, "paused", running=False)
    save(state_dir, "fresh", running=None)  # nothing applied yet
    save(state_dir, "leaving", running=True, intent=Intent.delete)
    template = tmp_path / "setup-tenant@.service"
    assert sorted(generate(state_dir, normal, template)) == ["db", "web"]
    assert wanted(normal) == ["setup-tenant@db.service", "setup-tenant@web.service"]
    link = normal / "multi-user.target.wants" / "setup-tenant@web.service"
    assert link.readlink() == template


def test_a_damaged_state_file_is_skipped_not_fatal(tmp_path: Path) -> None:
    state_dir, normal = tmp_path / "state", tmp_path / "normal"
    save(state_dir, "web", running=True)
    broken = state_dir / "tenants" / "broken"
    broken.mkdir(parents=True)
    (broken / "state.json").write_text("{not json")
    assert main([str(normal), str(tmp_path / "early"), str(tmp_path / "late")], state_dir) == 0
    assert wanted(normal) == ["setup-tenant@web.service"]


def test_no_state_dir_means_nothing_to_do(tmp_path: Path) -> None:
    assert main([str(tmp_path / "normal")], tmp_path / "missing") == 0
    assert wanted(tmp_path / "normal") == []


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    assert main([str(tmp_path), str(tmp_path)], tmp_path) == 2


def test_template_path_prefers_the_first_dir_that_has_it(tmp_path: Path) -> None:
    etc, lib = tmp_path / "etc", tmp_path / "lib"
    lib.mkdir()
    (lib / "setup-tenant@.service").write_text("")
    assert template_path((etc, lib)) == lib / "setup-tenant@.service"
    etc.mkdir()
    (etc / "setup-tenant@.service").write_text("")
    assert template_path((etc, lib)) == etc / "setup-tenant@.service"
