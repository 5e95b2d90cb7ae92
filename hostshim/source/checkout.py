"""Write one git tree into a fresh directory, with the layout limits enforced while writing.

The shim writes the files itself rather than using a worktree checkout: every entry is created
relative to an open directory fd with O_EXCL/O_NOFOLLOW, names are checked (a crafted tree may
carry '..' or '/'), and sizes are checked from object headers before a blob is read, so a
hostile tree can neither escape the directory nor fill the disk.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path, PurePosixPath

import pygit2
from pygit2.enums import FileMode

from bitbuilder.hostshim import safepath
from bitbuilder.hostshim.errors import LayoutError
from bitbuilder.hostshim.source.layout import MAX_ENTRIES, MAX_TREE_BYTES

_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# What a crafted tree can make the filesystem refuse: a name or link target too long, an
# empty link target. Anything else (disk full, ...) is the host's problem.
_ENTRY_ERRORS = (errno.ENAMETOOLONG, errno.ENOENT, errno.EINVAL)


class _Budget:
    def __init__(self) -> None:
        self.entries = 0
        self.bytes = 0

    def spend(self, rel: PurePosixPath, size: int) -> None:
        self.entries += 1
        self.bytes += size
        if self.entries > MAX_ENTRIES:
            raise LayoutError(f"{rel}: the revision has more than {MAX_ENTRIES} entries")
        if self.bytes > MAX_TREE_BYTES:
            raise LayoutError(f"{rel}: the revision exceeds {MAX_TREE_BYTES >> 20} MiB")


def write_tree(repo: pygit2.Repository, tree: pygit2.Tree, dest: Path) -> None:
    """Create `dest` (must not exist) holding exactly `tree`. Raises LayoutError on limits."""
    os.mkdir(dest, 0o755)
    with safepath.fd_closing(safepath.open_dir(dest)) as fd:
        _write(repo, tree, fd, PurePosixPath(), _Budget())


def _write(
    repo: pygit2.Repository, tree: pygit2.Tree, fd: int, where: PurePosixPath, budget: _Budget
) -> None:
    seen: set[str] = set()
    for entry in tree:
        name = entry.name
        rel = where / (name or "?")
        if not name or name in (".", "..") or "/" in name or "\x00" in name:
            raise LayoutError(f"{where}/{name!r}: invalid file name in the git tree")
        if name in seen:  # only a crafted tree object has this; git itself never writes one
            raise LayoutError(f"{rel}: the git tree names this entry twice")
        seen.add(name)
        try:
            _create(repo, entry, fd, rel, budget)
        except ValueError as exc:  # a NUL in a link target
            raise LayoutError(f"{rel!s:.300}: cannot be checked out ({exc})") from exc
        except OSError as exc:
            if exc.errno not in _ENTRY_ERRORS:
                raise  # the host's problem (disk full, ...), not the revision's
            raise LayoutError(f"{rel!s:.300}: cannot be checked out ({exc.strerror})") from exc


def _create(
    repo: pygit2.Repository, entry: pygit2.Object, fd: int, rel: PurePosixPath, budget: _Budget
) -> None:
    name = rel.name
    mode = entry.filemode
    if mode == FileMode.COMMIT:  # a submodule: git leaves an empty directory too
        budget.spend(rel, 0)
        os.mkdir(name, 0o755, dir_fd=fd)
    elif isinstance(entry, pygit2.Tree):
        budget.spend(rel, 0)
        os.mkdir(name, 0o755, dir_fd=fd)
        with safepath.fd_closing(os.open(name, safepath.DIR_FLAGS, dir_fd=fd)) as sub:
            _write(repo, entry, sub, rel, budget)
    elif isinstance(entry, pygit2.Blob):
        budget.spend(rel, repo.odb.read_header(entry.id)[1])
        if mode == FileMode.LINK:
            os.symlink(os.fsdecode(entry.data), name, dir_fd=fd)
        else:
            executable = mode == FileMode.BLOB_EXECUTABLE
            _write_file(fd, name, entry.data, 0o755 if executable else 0o644)
    else:
        raise LayoutError(f"{rel}: unexpected {entry.type_str} in the git tree")


def _write_file(dir_fd: int, name: str, data: bytes, mode: int) -> None:
    out = os.open(name, _FILE_FLAGS, mode, dir_fd=dir_fd)
    with safepath.fd_closing(out):
        view = memoryview(data)
        while view:
            view = view[os.write(out, view) :]
        os.fchmod(out, mode)
        os.fsync(out)
