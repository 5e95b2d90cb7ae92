"""Verified image import: raw GPT disks, sha256, SHA256SUMS signed by a trusted OpenPGP key.
Every refusal has its own reason and leaves nothing in the store."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from bitbuilder.hostshim.api import ImageSpec, ImageType
from bitbuilder.hostshim.config import ShimConfig
from bitbuilder.hostshim.errors import ImageError
from bitbuilder.hostshim.images.store import ImageStore
from tests.helpers.gitserve import Signer, gpg_signer
from tests.runner.conftest import runner_config
from tests.runner.test_images import add_file, make_tar

MiB = 1 << 20


@pytest.fixture(scope="module")
def signer() -> Iterator[Signer]:
    with gpg_signer("Images") as s:
        yield s


@pytest.fixture(scope="module")
def stranger() -> Iterator[Signer]:
    with gpg_signer("Stranger") as s:
        yield s


@pytest.fixture
def store(tmp_path: Path, trusted: Path, signer: Signer) -> ImageStore:
    key = tmp_path / "images.asc"
    key.write_text(signer.public_key)
    return ImageStore(runner_config(tmp_path, trusted, trusted_image_keys=(key,)))


def gpt_disk(path: Path, size: int = 4 * MiB) -> str:
    """A sparse file with a protective MBR and a valid primary GPT header (no partitions)."""
    header = bytearray(92)
    struct.pack_into("<8sIII", header, 0, b"EFI PART", 0x10000, 92, 0)
    struct.pack_into("<QQQQ", header, 24, 1, size // 512 - 1, 34, size // 512 - 34)
    struct.pack_into("<QII", header, 72, 2, 128, 128)
    struct.pack_into("<I", header, 16, zlib.crc32(bytes(header)))
    with path.open("wb") as f:
        f.truncate(size)
        f.seek(510)
        f.write(b"\x55\xaa")
        f.seek(512)
        f.write(header)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sign_sums(folder: Path, signer: Signer, *names: str) -> None:
    lines = [f"{hashlib.sha256((folder / n).read_bytes()).hexdigest()}  {n}\n" for n in names]
    (folder / "SHA256SUMS").write_text("".join(lines))
    subprocess.run(
        ["gpg", "--batch", "--yes", "--detach-sign", "-o", "SHA256SUMS.gpg", "SHA256SUMS"],
        cwd=folder, env={**os.environ, **signer.env}, check=True, capture_output=True,
    )  # fmt: skip


def refused(store: ImageStore, spec: ImageSpec) -> ImageError:
    with pytest.raises(ImageError) as caught:
        store.put("img", spec)
    leftovers = sorted(p.name for p in store.root.iterdir()) if store.root.exists() else []
    assert leftovers == [], leftovers  # no staging, download or half-imported image
    return caught.value


def signed(url: str) -> ImageSpec:
    return ImageSpec.model_validate({"url": url, "verify": "signature"})


def test_raw_image_by_url_and_by_path(store: ImageStore, trusted: Path) -> None:
    sha = gpt_disk(trusted / "disk.raw")
    status = store.put("disk", ImageSpec(url=(trusted / "disk.raw").as_uri(), sha256=sha))
    assert (status.type, status.sha256, status.verification) == (ImageType.raw, sha, "sha256")
    stored = store.root / "disk" / "image.raw"
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == sha
    assert os.stat(stored).st_blocks * 512 < MiB  # copied sparse
    status = store.put("local", ImageSpec(path=str(trusted / "disk.raw")))
    assert (status.type, status.verification) == (ImageType.raw, "trusted-path")
    with pytest.raises(ImageError) as caught:
        store.rootfs("disk")
    assert caught.value.reason == "ImageTypeUnsupported"
    assert [i.type for i in store.list()] == [ImageType.raw, ImageType.raw]


def test_a_raw_image_that_is_not_a_gpt_disk_is_refused(store: ImageStore, trusted: Path) -> None:
    (trusted / "junk.img").write_bytes(os.urandom(8192))
    sha = hashlib.sha256((trusted / "junk.img").read_bytes()).hexdigest()
    error = refused(store, ImageSpec(url=(trusted / "junk.img").as_uri(), sha256=sha))
    assert error.reason == "ImageInvalid" and "not a GPT disk" in error.message
    gpt_disk(trusted / "bad.raw")
    with (trusted / "bad.raw").open("r+b") as f:
        f.seek(512 + 40)
        f.write(b"\xff")  # header changed after its CRC
    error = refused(store, ImageSpec(path=str(trusted / "bad.raw")))
    assert error.reason == "ImageInvalid" and "CRC" in error.message


def test_wrong_sha256_of_a_raw_image(store: ImageStore, trusted: Path) -> None:
    gpt_disk(trusted / "disk.raw")
    error = refused(store, ImageSpec(url=(trusted / "disk.raw").as_uri(), sha256="0" * 64))
    assert error.reason == "ImageDigestMismatch" and "0" * 64 in error.message


def test_signed_tarball_and_raw_import(store: ImageStore, trusted: Path, signer: Signer) -> None:
    make_tar(trusted / "root.tar.gz", add_file("etc/os-release", b"ID=test\n"))
    gpt_disk(trusted / "disk.raw")
    sign_sums(trusted, signer, "root.tar.gz", "disk.raw")
    status = store.put("root", signed((trusted / "root.tar.gz").as_uri()))
    assert status.type is ImageType.directory
    assert status.verification is not None and status.verification.startswith("signature ")
    assert (store.rootfs("root") / "etc/os-release").read_text() == "ID=test\n"
    assert store.put("disk", signed((trusted / "disk.raw").as_uri())).type is ImageType.raw


def test_a_tampered_image_with_good_sums_is_refused(
    store: ImageStore, trusted: Path, signer: Signer
) -> None:
    make_tar(trusted / "root.tar.gz", add_file("etc/a"))
    sign_sums(trusted, signer, "root.tar.gz")
    make_tar(trusted / "root.tar.gz", add_file("etc/evil"))
    error = refused(store, signed((trusted / "root.tar.gz").as_uri()))
    assert error.reason == "ImageDigestMismatch"


def test_a_bad_signature_is_refused(store: ImageStore, trusted: Path, signer: Signer) -> None:
    make_tar(trusted / "root.tar.gz", add_file("etc/a"))
    sign_sums(trusted, signer, "root.tar.gz")
    sums = trusted / "SHA256SUMS"
    sums.write_text(sums.read_text() + f"{'1' * 64}  other.raw\n")  # changed after signing
    error = refused(store, signed((trusted / "root.tar.gz").as_uri()))
    assert error.reason == "ImageSignatureInvalid" and "bad OpenPGP signature" in error.message


def test_a_missing_signature_is_refused(store: ImageStore, trusted: Path, signer: Signer) -> None:
    make_tar(trusted / "root.tar.gz", add_file("etc/a"))
    sign_sums(trusted, signer, "root.tar.gz")
    (trusted / "SHA256SUMS.gpg").unlink()
    error = refused(store, signed((trusted / "root.tar.gz").as_uri()))
    assert error.reason == "ImageSignatureMissing" and "SHA256SUMS.gpg" in error.message
    (trusted / "SHA256SUMS").unlink()
    assert refused(store, signed((trusted / "root.tar.gz").as_uri())).reason == (
        "ImageChecksumsMissing"
    )


def test_an_untrusted_key_is_refused(store: ImageStore, trusted: Path, stranger: Signer) -> None:
    make_tar(trusted / "root.tar.gz", add_file("etc/a"))
    sign_sums(trusted, stranger, "root.tar.gz")
    error = refused(store, signed((trusted / "root.tar.gz").as_uri()))
    assert error.reason == "ImageKeyUntrusted" and "untrusted OpenPGP key" in error.message


def test_an_image_the_sums_do_not_list(store: ImageStore, trusted: Path, signer: Signer) -> None:
    make_tar(trusted / "root.tar.gz", add_file("etc/a"))
    make_tar(trusted / "other.tar.gz", add_file("etc/b"))
    sign_sums(trusted, signer, "other.tar.gz")
    assert refused(store, signed((trusted / "root.tar.gz").as_uri())).reason == "ImageNotListed"


def test_no_trusted_keys_means_no_signed_images(
    tmp_path: Path, trusted: Path, signer: Signer
) -> None:
    store = ImageStore(ShimConfig(state_dir=tmp_path / "s", trusted_image_paths=(trusted,)))
    make_tar(trusted / "root.tar.gz", add_file("etc/a"))
    sign_sums(trusted, signer, "root.tar.gz")
    error = refused(store, signed((trusted / "root.tar.gz").as_uri()))
    assert error.reason == "ImageKeyUntrusted" and "--trusted-image-key" in error.message


def test_signed_import_over_http(
    store: ImageStore, http_root: tuple[Path, str], signer: Signer
) -> None:
    root, base = http_root
    gpt_disk(root / "disk.raw")
    sign_sums(root, signer, "disk.raw")
    assert store.put("disk", signed(f"{base}/disk.raw")).type is ImageType.raw


def test_delete_removes_the_image(store: ImageStore, trusted: Path) -> None:
    gpt_disk(trusted / "disk.raw")
    store.put("disk", ImageSpec(path=str(trusted / "disk.raw")))
    store.delete("disk")
    assert store.list() == [] and not (store.root / "disk").exists()
    with pytest.raises(ImageError) as caught:
        store.delete("disk")
    assert caught.value.reason == "ImageNotFound"
