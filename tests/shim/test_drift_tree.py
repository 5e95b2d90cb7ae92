"""Revision trees against their commits: every kind of change on the host is found."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pygit2
import pytest

from bitbuilder.hostshim.machine import drift
from bitbuilder.hostshim.machine.drift import TreeVerifier, tree_differences
from bitbuilder.hostshim.source.checkout import write_tree
from tests.helpers.gitserve import Content, Link, TenantRepo

FILES: dict[str, Content] = {
    "confext/base/etc/motd": "hello\n",
    "sysext/tools/usr/bin/tool": "#!/bin/sh\n",
    "confext/base/etc/localtime": Link("../usr/share/zoneinfo/UTC"),
    "units/web.service": "[Service]\nExecStart=/bin/true\n",
}


@pytest.fixture
def checked_out(tmp_path: Path) -> tuple[Path, str, Path]:
    """(bare repo, commit, a fresh checkout of it written the way the git source writes it)."""
    repo = TenantRepo(tmp_path / "served")
    repo.commit(FILES)
    os.chmod(repo.work / "sysext/tools/usr/bin/tool", 0o755)
    commit = repo.commit(message="executable")
    bare = pygit2.Repository(str(repo.bare))
    tree = tmp_path / "tree"
    write_tree(bare, bare[commit].peel(pygit2.Tree), tree)
    return repo.bare, commit, tree


def _write(path: Path) -> None:
    path.write_text("changed\n")


def _chmod(path: Path) -> None:
    path.chmod(0o644)


def _relink(path: Path) -> None:
    path.unlink()
    path.symlink_to("/etc/shadow")


def _to_file(path: Path) -> None:
    path.unlink()
    path.write_text("../usr/share/zoneinfo/UTC")


CHANGES: list[tuple[str, Callable[[Path], None]]] = [
    ("confext/base/etc/motd", _write),
    ("sysext/tools/usr/bin/tool", _chmod),
    ("confext/base/etc/localtime", _relink),
    ("confext/base/etc/localtime", _to_file),
    ("units/web.service", Path.unlink),
    ("units/extra.service", _write),
]


def test_a_clean_checkout_matches(checked_out: tuple[Path, str, Path]) -> None:
    assert tree_differences(*checked_out) == []


@pytest.mark.parametrize(("rel", "change"), CHANGES)
def test_every_change_is_found(
    checked_out: tuple[Path, str, Path], rel: str, change: Callable[[Path], None]
) -> None:
    repo, commit, tree = checked_out
    change(tree / rel)
    assert tree_differences(repo, commit, tree) == [rel]


def test_a_missing_commit_is_a_difference(checked_out: tuple[Path, str, Path]) -> None:
    repo, _, tree = checked_out
    assert tree_differences(repo, "0" * 40, tree) != []


def test_verifier_reads_a_clean_tree_once_and_still_sees_changes(
    checked_out: tuple[Path, str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, commit, tree = checked_out
    full_checks: list[Path] = []
    real = drift.tree_differences

    def counting(repo_path: Path, commit: str, tree_dir: Path) -> list[str]:
        full_checks.append(tree_dir)
        return real(repo_path, commit, tree_dir)

    monkeypatch.setattr(drift, "tree_differences", counting)
    verify = TreeVerifier()
    assert verify(repo, commit, tree) == [] and verify(repo, commit, tree) == []
    assert len(full_checks) == 1
    # Same size, mtime put back: the ctime still tells.
    motd = tree / "confext/base/etc/motd"
    st = motd.stat()
    motd.write_text("HELLO\n")
    os.utime(motd, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert verify(repo, commit, tree) == ["confext/base/etc/motd"]
    assert verify(repo, commit, tree) == ["confext/base/etc/motd"]  # not cached while dirty
    assert len(full_checks) == 3
