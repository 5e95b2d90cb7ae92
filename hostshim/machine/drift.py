"""Does a checked-out revision tree still match its commit? (drift of files on the host)

Compares a directory against a commit's tree in the tenant's bare repo: every blob's content
and executable bit, every symlink's target, and nothing extra on disk. Never follows symlinks.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pygit2

_EXEC = 0o100755
_LINK = 0o120000
_GITLINK = 0o160000  # a submodule: checked out as an empty directory, if at all
_MAX_REPORTED = 20


def tree_differences(repo_path: Path, commit: str, tree_dir: Path) -> list[str]:
    """Paths (relative to tree_dir) that differ from `commit`'s tree; [] when identical.

    Stops after a few differences: one is enough to call the tree modified.
    """
    try:
        repo = pygit2.Repository(str(repo_path))
        tree = repo[commit].peel(pygit2.Tree)
    except (KeyError, ValueError, pygit2.GitError) as exc:
        return [f"(commit {commit} unreadable: {exc})"]
    found: list[str] = []
    _compare(repo, tree, tree_dir, "", found)
    return found


def _compare(
    repo: pygit2.Repository, tree: pygit2.Tree, folder: Path, rel: str, found: list[str]
) -> None:
    try:
        on_disk = set(os.listdir(folder))
    except OSError:
        found.append(rel or ".")
        return
    for entry in tree:
        if len(found) >= _MAX_REPORTED:
            return
        name = entry.name
        assert name is not None
        path = folder / name
        shown = f"{rel}{name}"
        on_disk.discard(name)
        if entry.filemode == _GITLINK:
            continue
        try:
            st = path.lstat()
        except OSError:
            found.append(shown)
            continue
        if entry.type_str == "tree":
            if not stat.S_ISDIR(st.st_mode):
                found.append(shown)
            else:
                _compare(repo, repo[entry.id].peel(pygit2.Tree), path, shown + "/", found)
        elif entry.filemode == _LINK:
            blob = repo[entry.id].peel(pygit2.Blob)
            if not stat.S_ISLNK(st.st_mode) or os.fsencode(os.readlink(path)) != blob.data:
                found.append(shown)
        elif (
            not stat.S_ISREG(st.st_mode)
            or bool(st.st_mode & 0o100) != (entry.filemode == _EXEC)
            or pygit2.hashfile(str(path)) != entry.id
        ):
            found.append(shown)
    found.extend(f"{rel}{extra}" for extra in sorted(on_disk)[: _MAX_REPORTED - len(found)])


Signature = dict[str, tuple[int, int, int, int, int]]


def _signature(tree_dir: Path) -> Signature:
    """inode, mode, size, mtime and ctime of every entry (lstat: links are not followed)."""
    found: Signature = {}
    for root, dirs, files in os.walk(tree_dir):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            found[path] = (st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return found


class TreeVerifier:
    """tree_differences that reads a tree's files only when something in it changed.

    After a clean full comparison it remembers every entry's stat signature; while that is
    unchanged the tree is not read again. ctime is part of it and cannot be set from user
    space, so any write, chmod, rename or replacement since shows, even with mtime restored.
    """

    def __init__(self) -> None:
        self._clean: dict[Path, tuple[str, Signature]] = {}

    def __call__(self, repo_path: Path, commit: str, tree_dir: Path) -> list[str]:
        before = _signature(tree_dir)
        if self._clean.get(tree_dir) == (commit, before):
            return []
        found = tree_differences(repo_path, commit, tree_dir)
        if not found and _signature(tree_dir) == before:
            self._clean[tree_dir] = (commit, before)
        else:
            self._clean.pop(tree_dir, None)
        return found
