"""safepath never follows a symlink out of its root and never crosses a mount point."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pygit2
import pytest
from pygit2.enums import ObjectType

from bitbuilder.hostshim import safepath
from bitbuilder.hostshim.errors import LayoutError
from bitbuilder.hostshim.source.checkout import write_tree


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret").write_text("host secret\n")
    return folder


@pytest.fixture
def root(tmp_path: Path, outside: Path) -> Path:
    root = tmp_path / "root"
    (root / "dir/sub").mkdir(parents=True)
    (root / "dir/file").write_text("content\n")
    (root / "link-out").symlink_to(outside)
    (root / "dir/secret").symlink_to(outside / "secret")
    (root / "dir/inside").symlink_to("sub")
    return root


def test_open_and_read_refuse_symlinks_anywhere_on_the_path(root: Path) -> None:
    assert safepath.read_bytes(root, "dir/file", 100) == b"content\n"
    for rel in ("link-out/secret", "dir/secret", "dir/inside", "link-out"):
        with pytest.raises(safepath.UnsafePath, match="symlink"):
            safepath.read_bytes(root, rel, 100)
    with pytest.raises(safepath.UnsafePath, match="symlink"):
        safepath.open_dir(root, "dir/inside")
    for bad in ("../outside/secret", "/etc/passwd", "dir/../../outside/secret"):
        with pytest.raises(safepath.UnsafePath):
            safepath.read_bytes(root, bad, 100)
    with pytest.raises(safepath.UnsafePath, match="limit"):
        safepath.read_bytes(root, "dir/file", 3)
    with pytest.raises(FileNotFoundError):
        safepath.read_bytes(root, "dir/missing", 100)


def test_walk_reports_links_without_entering_them(root: Path) -> None:
    entries = {str(e.rel): e for e in safepath.walk(root)}
    assert set(entries) == {"dir", "dir/file", "dir/inside", "dir/secret", "dir/sub", "link-out"}
    assert safepath.kind(entries["link-out"].st.st_mode) == "symlink"


@pytest.fixture
def mounted(root: Path) -> Iterator[Path]:
    point = root / "dir/sub"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "bbtest", str(point)], check=True)
    try:
        (point / "on-the-mount").write_text("x")
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=True)


def test_walk_and_remove_do_not_cross_mount_points(root: Path, mounted: Path) -> None:
    assert "dir/sub/on-the-mount" not in {str(e.rel) for e in safepath.walk(root)}
    with pytest.raises(safepath.UnsafePath, match="mounted"):
        safepath.remove_tree(root)
    assert (mounted / "on-the-mount").exists() and (root / "dir/file").exists()


def test_remove_tree_never_follows_links(root: Path, outside: Path) -> None:
    safepath.remove_tree(root)
    assert not root.exists()
    assert (outside / "secret").read_text() == "host secret\n"
    safepath.remove_tree(root)  # missing is fine


def test_copy_tree_keeps_links_as_links_and_refuses_specials(root: Path, tmp_path: Path) -> None:
    safepath.copy_tree(root, "dir", tmp_path / "copy")
    assert (tmp_path / "copy/file").read_text() == "content\n"
    assert os.readlink(tmp_path / "copy/secret") == str(tmp_path / "outside/secret")
    assert (tmp_path / "copy/sub").is_dir()
    os.mkfifo(root / "dir/fifo")
    with pytest.raises(safepath.UnsafePath, match="fifo"):
        safepath.copy_tree(root, "dir", tmp_path / "copy2")


def test_copy_file_replaces_a_destination_link_instead_of_writing_through_it(
    root: Path, tmp_path: Path, outside: Path
) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "unit.service").symlink_to(outside / "secret")
    safepath.copy_file(root, "dir/file", dest, "unit.service")
    assert not (dest / "unit.service").is_symlink()
    assert (dest / "unit.service").read_text() == "content\n"
    assert (outside / "secret").read_text() == "host secret\n"
    with pytest.raises(safepath.UnsafePath):
        safepath.copy_file(root, "dir/secret", dest, "x")


@pytest.mark.parametrize("name", [b"..", b".", b"a/b"])
def test_crafted_git_tree_names_cannot_escape_the_checkout(tmp_path: Path, name: bytes) -> None:
    """A hand-made tree object (git fsck would refuse it) still cannot write outside."""
    repo = pygit2.init_repository(str(tmp_path / "r.git"), bare=True)
    blob = repo.create_blob(b"escaped\n")
    inner = repo.odb.write(ObjectType.TREE, b"100644 x\x00" + blob.raw)
    raw = b"40000 " + name + b"\x00" + pygit2.Oid(hex=str(inner)).raw
    tree = repo[repo.odb.write(ObjectType.TREE, raw)]
    assert isinstance(tree, pygit2.Tree)
    (tmp_path / "out").mkdir()
    with pytest.raises(LayoutError, match="invalid file name"):
        write_tree(repo, tree, tmp_path / "out" / "t")
    assert not (tmp_path / "out/x").exists() and not (tmp_path / "x").exists()


def test_crafted_git_tree_with_a_link_and_a_folder_of_one_name_is_a_layout_error(
    tmp_path: Path,
) -> None:
    """`confext` as a symlink to /etc and again as a folder: the second is refused by name
    (a LayoutError, so the revision is refused cleanly), nothing is written through the link."""
    repo = pygit2.init_repository(str(tmp_path / "r.git"), bare=True)
    link = repo.create_blob(str(tmp_path / "host").encode())
    inner = repo.odb.write(ObjectType.TREE, b"100644 x\x00" + repo.create_blob(b"in\n").raw)
    raw = b"120000 confext\x00" + link.raw + b"40000 confext\x00" + pygit2.Oid(hex=str(inner)).raw
    tree = repo[repo.odb.write(ObjectType.TREE, raw)]
    assert isinstance(tree, pygit2.Tree)
    (tmp_path / "host").mkdir()
    with pytest.raises(LayoutError, match="confext: the git tree names this entry twice"):
        write_tree(repo, tree, tmp_path / "t")
    assert list((tmp_path / "host").iterdir()) == []


@pytest.mark.parametrize(
    ("mode_and_name", "content", "named"),
    [(b"120000 link", b"/etc\x00x", "link"),  # a NUL in a link target
     (b"120000 link", b"", "link"),  # an empty link target
     (b"120000 link", b"x" * 5000, "link"),  # longer than a path may be
     (b"100644 " + b"n" * 300, b"x", "n" * 100),  # longer than a file name may be
     (b"40000 " + b"d" * 256, None, "d" * 100)],
)  # fmt: skip
def test_crafted_git_entries_the_filesystem_refuses_are_layout_errors(
    tmp_path: Path, mode_and_name: bytes, content: bytes | None, named: str
) -> None:
    """A LayoutError naming the entry (the revision is refused), not an internal error."""
    repo = pygit2.init_repository(str(tmp_path / "r.git"), bare=True)
    if content is None:
        oid = repo.odb.write(ObjectType.TREE, b"100644 x\x00" + repo.create_blob(b"x").raw)
    else:
        oid = repo.create_blob(content)
    tree = repo[repo.odb.write(ObjectType.TREE, mode_and_name + b"\x00" + oid.raw)]
    assert isinstance(tree, pygit2.Tree)
    with pytest.raises(LayoutError, match="cannot be checked out") as caught:
        write_tree(repo, tree, tmp_path / "t")
    assert caught.value.message.startswith(named)
