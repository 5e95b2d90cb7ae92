"""Image import: trusted directories, sha256-verified tarballs, hostile archives refused."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from bitbuilder.hostshim.api import ImageSpec
from bitbuilder.hostshim.errors import ImageError
from bitbuilder.hostshim.images.store import ImageStore
from tests.runner.conftest import runner_config

Member = Callable[[tarfile.TarFile], None]


@pytest.fixture
def store(tmp_path: Path, trusted: Path) -> ImageStore:
    return ImageStore(runner_config(tmp_path, trusted))


def add_file(name: str, data: bytes = b"x", uid: int = 0) -> Member:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.uid, info.gid, info.mode = len(data), uid, uid, 0o644
        tar.addfile(info, io.BytesIO(data))

    return add


def add_link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> Member:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, target
        tar.addfile(info)

    return add


def make_tar(path: Path, *members: Member, mode: str = "w:gz") -> str:
    with tarfile.open(path, mode) as tar:  # type: ignore[call-overload]
        for member in members:
            member(tar)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def put_tar(store: ImageStore, tarball: Path, sha: str, name: str = "base") -> None:
    store.put(name, ImageSpec(url=tarball.as_uri(), sha256=sha))


def reason(call: Callable[[], object]) -> str:
    with pytest.raises(ImageError) as error:
        call()
    return error.value.reason


def test_directory_import_keeps_symlinks_and_is_idempotent(
    store: ImageStore, trusted: Path
) -> None:
    tree = trusted / "rootfs"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/hostname").write_text("img\n")
    (tree / "etc/passwd-link").symlink_to("/etc/passwd")  # valid inside the machine only
    status = store.put("base", ImageSpec(path=str(tree)))
    rootfs = store.rootfs("base")
    assert (rootfs / "etc/hostname").read_text() == "img\n"
    assert os.readlink(rootfs / "etc/passwd-link") == "/etc/passwd", "copied as a symlink"
    assert status.sha256 is None and status.source == str(tree) and status.size_bytes > 0
    again = store.put("base", ImageSpec(path=str(tree)))
    assert again.imported_at == status.imported_at, "same spec: nothing re-imported"
    assert [s.name for s in store.list()] == ["base"]


def test_directories_outside_trusted_paths_are_refused(
    store: ImageStore, trusted: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (trusted / "escape").symlink_to(outside)
    for path in (str(outside), str(trusted / "escape"), "relative/dir", f"{trusted}/../elsewhere"):
        spec = ImageSpec(path=path)
        assert reason(lambda: store.put("x", spec)) == "ImageSourceNotAllowed"  # noqa: B023
    assert reason(lambda: store.put("x", ImageSpec(path=str(trusted), sha256="0" * 64))) == (
        "ImageInvalid"
    )
    assert store.list() == []


def test_tarball_verified_then_unpacked_with_numeric_owners(
    store: ImageStore, trusted: Path
) -> None:
    tarball = trusted / "img.tar.gz"
    sha = make_tar(tarball, add_file("etc/os-release", b"ID=test\n", uid=4321),
                   add_link("bin/sh", "busybox"))  # fmt: skip
    put_tar(store, tarball, sha)
    rootfs = store.rootfs("base")
    assert (rootfs / "etc/os-release").read_text() == "ID=test\n"
    assert (rootfs / "etc/os-release").stat().st_uid == 4321
    assert os.readlink(rootfs / "bin/sh") == "busybox"
    first = store.get("base")
    assert first.sha256 == sha
    put_tar(store, tarball, sha)
    assert store.get("base").imported_at == first.imported_at, "same sha: nothing re-imported"


def test_sha_mismatch_is_refused_before_unpacking(
    store: ImageStore, trusted: Path, tmp_path: Path
) -> None:
    tarball = trusted / "img.tar.gz"
    make_tar(tarball, add_file("etc/x"))
    assert reason(lambda: put_tar(store, tarball, "f" * 64)) == "ImageDigestMismatch"
    assert reason(lambda: store.get("base")) == "ImageNotFound"
    assert [p.name for p in (tmp_path / "state/images").iterdir()] == []


@pytest.mark.parametrize(
    "members",
    [
        [add_file("../evil")],
        [add_file("/abs-evil")],
        [add_file("etc/../../evil")],
        [add_link("escape", "/"), add_file("escape/evil")],
        [add_link("escape", ".."), add_file("escape/evil")],
        [add_link("escape", "/tmp"), add_link("hard", "escape/evil", tarfile.LNKTYPE)],
        [add_link("hard", "../../etc/passwd", tarfile.LNKTYPE)],
    ],
    ids=["dotdot", "absolute", "inner-dotdot", "through-abs-symlink", "through-rel-symlink",
         "hardlink-through-symlink", "hardlink-dotdot"],
)  # fmt: skip
def test_traversal_in_tarballs_is_refused(
    store: ImageStore, trusted: Path, tmp_path: Path, members: list[Member]
) -> None:
    tarball = trusted / "evil.tar"
    sha = make_tar(tarball, *members, mode="w")
    assert reason(lambda: put_tar(store, tarball, sha)) == "ImageInvalid"
    assert not (tmp_path / "evil").exists() and not Path("/evil").exists()
    assert not Path("/tmp/evil").exists()
    assert store.list() == []


@pytest.mark.parametrize(
    "members",
    [[add_link("hard", "no-such-member", tarfile.LNKTYPE)], [add_file("n" * 300)]],
    ids=["hardlink-to-nothing", "name-too-long"],
)
def test_archives_the_host_cannot_unpack_are_invalid(
    store: ImageStore, trusted: Path, members: list[Member]
) -> None:
    """ImageInvalid (a 4xx through the API), not an internal error."""
    tarball = trusted / "odd.tar"
    sha = make_tar(tarball, *members, mode="w")
    assert reason(lambda: put_tar(store, tarball, sha)) == "ImageInvalid"
    assert store.list() == []


def test_device_nodes_are_skipped(store: ImageStore, trusted: Path) -> None:
    def device(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("dev/sda")
        info.type, info.devmajor, info.devminor = tarfile.BLKTYPE, 8, 0
        tar.addfile(info)

    tarball = trusted / "dev.tar"
    put_tar(store, tarball, make_tar(tarball, device, add_file("etc/ok"), mode="w"))
    assert (store.rootfs("base") / "etc/ok").exists()
    assert not (store.rootfs("base") / "dev/sda").exists()


def test_file_urls_outside_trusted_paths_are_refused(store: ImageStore, tmp_path: Path) -> None:
    tarball = tmp_path / "outside.tar.gz"
    sha = make_tar(tarball, add_file("etc/x"))
    assert reason(lambda: put_tar(store, tarball, sha)) == "ImageSourceNotAllowed"
    spec = ImageSpec(url="ftp://example.com/x.tar", sha256=sha)
    assert reason(lambda: store.put("x", spec)) == "ImageInvalid"


@pytest.mark.skipif(shutil.which("zstd") is None, reason="needs zstd")
def test_zstd_tarball(store: ImageStore, trusted: Path) -> None:
    plain = trusted / "img.tar"
    make_tar(plain, add_file("etc/zst", b"z"), mode="w")
    subprocess.run(["zstd", "-q", str(plain), "-o", str(trusted / "img.tar.zst")], check=True)
    zst = trusted / "img.tar.zst"
    put_tar(store, zst, hashlib.sha256(zst.read_bytes()).hexdigest())
    assert (store.rootfs("base") / "etc/zst").read_text() == "z"


def test_http_url_import(store: ImageStore, http_root: tuple[Path, str]) -> None:
    root, base = http_root
    sha = make_tar(root / "img.tar.gz", add_file("etc/from-http", b"h"))
    store.put("web", ImageSpec(url=f"{base}/img.tar.gz", sha256=sha))
    assert (store.rootfs("web") / "etc/from-http").read_text() == "h"
    missing = ImageSpec(url=f"{base}/missing.tar.gz", sha256=sha)
    assert reason(lambda: store.put("gone", missing)) == "ImageUnreachable"


def test_unknown_and_invalid_names(store: ImageStore) -> None:
    assert reason(lambda: store.get("nope")) == "ImageNotFound"
    assert reason(lambda: store.rootfs("../etc")) == "ImageNotFound"
