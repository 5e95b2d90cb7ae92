"""File access inside a root directory that never follows a symlink out of it.

Tenant repos are hostile input: any component of a path inside one may be a symlink to the
host's /etc. Everything here walks relative to an open directory fd, one component at a time,
with O_NOFOLLOW, so a symlink is seen as a symlink and never resolved on the host (the approach
KubeVirt's safepath takes). Symlinks themselves may be listed and copied as links.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")  # mountinfo writes ' ' as \040
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class UnsafePath(OSError):
    """A path component is a symlink, not a directory, a mount point or an invalid name."""


def components(rel: str | PurePosixPath) -> list[str]:
    """The components of a relative path; refuses absolute paths, '..' and NUL."""
    text = str(rel)
    if text.startswith("/") or "\x00" in text:
        raise UnsafePath(f"not a relative path: {text!r}")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafePath(f"path must not contain '..': {text!r}")
    return parts


@contextmanager
def fd_closing(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def open_dir(root: Path | int, rel: str | PurePosixPath = "") -> int:
    """An fd for the directory `rel` below `root`, with no symlink followed on the way.

    `root` itself is trusted (the shim's own directory); a path or an open dir fd (not closed).
    """
    fd = os.open(root, DIR_FLAGS) if isinstance(root, Path) else os.dup(root)
    try:
        for part in components(rel):
            try:
                nxt = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise _explain(exc, fd, part, rel) from exc
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file(root: Path | int, rel: str | PurePosixPath) -> int:
    """A read-only fd for the regular file `rel` below `root`; symlinks and specials refused."""
    parts = components(rel)
    if not parts:
        raise UnsafePath("empty file path")
    with fd_closing(open_dir(root, "/".join(parts[:-1]))) as dfd:
        try:
            fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=dfd)
        except OSError as exc:
            raise _explain(exc, dfd, parts[-1], rel) from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePath(f"{rel} is not a regular file")
    os.set_blocking(fd, True)
    return fd


def _explain(exc: OSError, dir_fd: int, name: str, rel: str | PurePosixPath) -> OSError:
    """Turn ELOOP/ENOTDIR into a message that says which component is the problem."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except OSError:
        return exc  # genuinely missing: keep FileNotFoundError
    if stat.S_ISLNK(st.st_mode):
        return UnsafePath(f"{rel}: {name!r} is a symlink (never followed)")
    return UnsafePath(f"{rel}: {name!r} is not what was expected ({kind(st.st_mode)})")


def kind(mode: int) -> str:
    """A readable name for a file type: 'symlink', 'fifo', ..."""
    for test, name in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISREG, "file"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "unknown file type"


def read_bytes(root: Path | int, rel: str | PurePosixPath, limit: int) -> bytes:
    """The content of a regular file below `root`, refusing files larger than `limit`."""
    with fd_closing(open_file(root, rel)) as fd:
        size = os.fstat(fd).st_size
        if size > limit:
            raise UnsafePath(f"{rel} is {size} bytes, more than the limit of {limit}")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
    if len(data) > limit:
        raise UnsafePath(f"{rel} grew beyond the limit of {limit} bytes")
    return data


def lstat(root: Path | int, rel: str | PurePosixPath) -> os.stat_result:
    """lstat of `rel` below `root` (its parents reached without following symlinks)."""
    parts = components(rel)
    if not parts:
        return os.stat(root, follow_symlinks=False)
    with fd_closing(open_dir(root, "/".join(parts[:-1]))) as dfd:
        return os.lstat(parts[-1], dir_fd=dfd)


@dataclass(frozen=True)
class Entry:
    rel: PurePosixPath  # relative to the walked directory
    st: os.stat_result  # lstat: a symlink is reported as a symlink


def walk(root: Path | int, rel: str | PurePosixPath = "") -> Iterator[Entry]:
    """Every entry below `rel` (pre-order, sorted), never following symlinks or crossing mounts.

    Directories on another device are reported but not entered.
    """
    with fd_closing(open_dir(root, rel)) as fd:
        yield from _walk_fd(fd, PurePosixPath(), os.fstat(fd).st_dev)


def _walk_fd(fd: int, prefix: PurePosixPath, dev: int) -> Iterator[Entry]:
    with os.scandir(fd) as it:
        names = sorted(e.name for e in it)
    for name in names:
        st = os.lstat(name, dir_fd=fd)
        yield Entry(prefix / name, st)
        if stat.S_ISDIR(st.st_mode) and st.st_dev == dev:
            with fd_closing(os.open(name, DIR_FLAGS, dir_fd=fd)) as sub:
                yield from _walk_fd(sub, prefix / name, dev)


def copy_file(
    src_root: Path | int,
    rel: str | PurePosixPath,
    dst_dir: Path | int,
    name: str,
    mode: int = 0o644,
) -> None:
    """Copy the regular file `rel` (below `src_root`) to `dst_dir/name`, replacing atomically.

    Neither side follows symlinks: the destination is written as a temp file then renamed over.
    """
    if "/" in name or name in ("", ".", ".."):
        raise UnsafePath(f"invalid file name {name!r}")
    tmp = f".{name}.{secrets.token_hex(6)}.tmp"
    with (
        fd_closing(open_file(src_root, rel)) as src,
        fd_closing(open_dir(dst_dir)) as dfd,
    ):
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode, dir_fd=dfd)
        try:
            with fd_closing(out):
                while chunk := os.read(src, 1 << 16):
                    os.write(out, chunk)
                os.fchmod(out, mode)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            os.unlink(tmp, dir_fd=dfd)
            raise


def copy_tree(src_root: Path | int, rel: str | PurePosixPath, dst: Path) -> None:
    """Copy the directory `rel` below `src_root` to the new directory `dst`.

    Symlinks are recreated as symlinks (same target text, never resolved); device nodes, fifos
    and sockets are refused; nothing crosses a mount point.
    """
    os.mkdir(dst, 0o755)
    with fd_closing(open_dir(src_root, rel)) as sfd, fd_closing(open_dir(dst)) as dfd:
        dev = os.fstat(sfd).st_dev
        for entry in _walk_fd(sfd, PurePosixPath(), dev):
            _copy_entry(sfd, dfd, entry, dev)


def _copy_entry(sfd: int, dfd: int, entry: Entry, dev: int) -> None:
    parent, name = str(entry.rel.parent), entry.rel.name
    mode = entry.st.st_mode
    with fd_closing(open_dir(dfd, parent)) as out_dir:
        if stat.S_ISDIR(mode):
            if entry.st.st_dev != dev:
                raise UnsafePath(f"{entry.rel} is a mount point")
            os.mkdir(name, stat.S_IMODE(mode) | 0o700, dir_fd=out_dir)
        elif stat.S_ISLNK(mode):
            with fd_closing(open_dir(sfd, parent)) as in_dir:
                target = os.readlink(name, dir_fd=in_dir)
            os.symlink(target, name, dir_fd=out_dir)
        elif stat.S_ISREG(mode):
            copy_file(sfd, entry.rel, out_dir, name, stat.S_IMODE(mode) & 0o777)
        else:
            raise UnsafePath(f"{entry.rel} is a {kind(mode)}: not copied")


def mount_points() -> list[Path]:
    """Mount points of this mount namespace (from /proc/self/mountinfo, octal escapes decoded)."""
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            field = line.split(" ")[4]
            points.append(Path(_OCTAL_ESCAPE.sub(lambda m: chr(int(m[1], 8)), field)))
    return points


def remove_tree(path: Path) -> None:
    """Remove `path` and everything below it; never follows symlinks, never crosses a mount.

    A mount point at or below `path` is an error raised before anything is removed. `path`
    itself may be a symlink (then only the link goes). Missing is fine.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    real = Path(os.path.realpath(path))
    inside = [m for m in mount_points() if m == real or real in m.parents]
    if inside:
        raise UnsafePath(f"refusing to remove {path}: {inside[0]} is mounted below it")
    with fd_closing(os.open(path, DIR_FLAGS)) as fd:
        _clear_dir(fd, st.st_dev, PurePosixPath(path))
    os.rmdir(path)


def _clear_dir(fd: int, dev: int, where: PurePosixPath) -> None:
    with os.scandir(fd) as it:
        names = [e.name for e in it]
    for name in names:
        st = os.lstat(name, dir_fd=fd)
        if stat.S_ISDIR(st.st_mode):
            if st.st_dev != dev:
                raise UnsafePath(f"refusing to cross the mount point {where / name}")
            with fd_closing(os.open(name, DIR_FLAGS, dir_fd=fd)) as sub:
                _clear_dir(sub, dev, where / name)
            os.rmdir(name, dir_fd=fd)
        else:
            os.unlink(name, dir_fd=fd)
