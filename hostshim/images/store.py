"""Base images: root filesystem trees imported once, stored under ImagePaths, never modified.

Sources: a directory or a raw GPT disk image under a trusted image path (copied, symlinks kept
as symlinks), or a tarball or raw image from file:// (under a trusted path) or http(s)://,
verified before a single byte is unpacked or kept: its sha256, or SHA256SUMS signed by a key
the host trusts (images/verify.py). Everything happens in a staging folder renamed into place
at the end, so a refused or failed import leaves nothing behind. Unpacking refuses traversal ('..', absolute names, links that leave
the tree, members below a symlink) and skips device nodes and fifos (nspawn brings /dev).
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import unquote, urljoin, urlsplit

from bitbuilder.hostshim.api import ImageSpec, ImageStatus, ImageType, ImageVerify
from bitbuilder.hostshim.config import ShimConfig
from bitbuilder.hostshim.errors import ImageError
from bitbuilder.hostshim.images.raw import check_gpt, is_raw_name
from bitbuilder.hostshim.images.verify import SIGNATURE, SUMS, check_sha256, signed_digest
from bitbuilder.hostshim.paths import ImagePaths, checked_name

MAX_DOWNLOAD_BYTES = 16 << 30
_CHUNK = 1 << 20


def _not_found(name: str) -> ImageError:
    return ImageError(f"image {name!r} is not imported on this host", reason="ImageNotFound")


def _not_allowed(what: str) -> ImageError:
    return ImageError(
        f"{what} is not under a trusted image path of this shim", reason="ImageSourceNotAllowed"
    )


def _busy(name: str) -> ImageError:
    return ImageError(
        f"image {name!r} is the root of running machines: stop them first", reason="ImageInUse"
    )


def _invalid(message: str) -> ImageError:
    return ImageError(message, reason="ImageInvalid")


@dataclass(frozen=True)
class _Filled:
    type: ImageType
    sha256: str | None
    source: str
    verification: str


def _spec_key(spec: ImageSpec) -> str:
    return hashlib.sha256(json.dumps(spec.wire(), sort_keys=True).encode()).hexdigest()


class ImageStore:
    def __init__(self, config: ShimConfig) -> None:
        self.config = config
        self.root = config.state_dir / "images"
        self._lock = threading.Lock()

    # --- queries ---------------------------------------------------------------------------

    def get(self, name: str) -> ImageStatus:
        return ImageStatus.model_validate(self._meta(name)["status"])

    def list(self) -> list[ImageStatus]:
        if not self.root.is_dir():
            return []
        names = sorted(p.name for p in self.root.iterdir() if not p.name.startswith("."))
        return [self.get(n) for n in names if ImagePaths(self.config, n).meta.is_file()]

    def rootfs(self, name: str) -> Path:
        """The root filesystem of a directory image (what nspawn boots)."""
        if self.get(name).type is not ImageType.directory:
            raise ImageError(
                f"image {name!r} is a raw disk image: containers need a directory or tarball image",
                reason="ImageTypeUnsupported",
            )
        return ImagePaths(self.config, name).rootfs

    def delete(self, name: str) -> None:
        """Remove an imported image; refused while a machine's root is mounted over it."""
        with self._lock:
            self._meta(name)
            paths = ImagePaths(self.config, name)
            if _in_use(paths.rootfs):
                raise _busy(name)
            retired = self.root / f".retired-{name}-{os.getpid()}"
            paths.root.rename(retired)
            shutil.rmtree(retired)

    def _meta(self, name: str) -> dict[str, object]:
        try:
            paths = ImagePaths(self.config, name)
        except ValueError as exc:
            raise _not_found(name) from exc
        try:
            meta = json.loads(paths.meta.read_text())
        except FileNotFoundError as exc:
            raise _not_found(name) from exc
        assert isinstance(meta, dict)
        return meta

    # --- import ----------------------------------------------------------------------------

    def put(self, name: str, spec: ImageSpec) -> ImageStatus:
        """Import `spec` as `name`. The same spec (or, for URLs, the same sha256) is a no-op."""
        checked_name(name)
        with self._lock:
            existing = self._existing(name, spec)
            if existing is not None:
                return existing
            self.root.mkdir(parents=True, exist_ok=True)
            staging = self.root / f".staging-{name}-{os.getpid()}-{threading.get_ident()}"
            shutil.rmtree(staging, ignore_errors=True)
            try:
                staging.mkdir()
                filled = self._fill(spec, staging)
                status = ImageStatus(
                    name=name,
                    type=filled.type,
                    sha256=filled.sha256,
                    size_bytes=_tree_size(staging),
                    imported_at=datetime.now(UTC),
                    source=filled.source,
                    verification=filled.verification,
                )
                meta = {"status": status.wire(), "specKey": _spec_key(spec)}
                (staging / "image.json").write_text(json.dumps(meta, indent=2))
                self._swap_in(name, staging)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            return status

    def _existing(self, name: str, spec: ImageSpec) -> ImageStatus | None:
        try:
            meta = self._meta(name)
        except ImageError:
            return None
        status = ImageStatus.model_validate(meta["status"])
        if meta.get("specKey") == _spec_key(spec):
            return status
        if spec.sha256 is not None and status.sha256 == spec.sha256:
            return status
        return None

    def _swap_in(self, name: str, staging: Path) -> None:
        final = ImagePaths(self.config, name).root
        if _in_use(ImagePaths(self.config, name).rootfs):
            raise _busy(name)
        retired = self.root / f".retired-{name}-{os.getpid()}"
        if final.exists():
            final.rename(retired)
        staging.rename(final)
        shutil.rmtree(retired, ignore_errors=True)

    def _fill(self, spec: ImageSpec, staging: Path) -> _Filled:
        """Put the verified image into `staging` (rootfs/ or image.raw)."""
        if spec.path is not None:
            return self._fill_from_path(spec, staging)
        assert spec.url is not None
        raw = is_raw_name(urlsplit(spec.url).path)
        expected, verification = spec.sha256, "sha256"
        if spec.verify is ImageVerify.signature:
            expected, verification = self._signed_digest(spec.url, spec.sha256)
        assert expected is not None
        with self._download(spec.url) as download:
            check_sha256(download, expected, spec.url)
            if raw:
                check_gpt(download, spec.url)
                _copy_file(download, staging / "image.raw")
            else:
                (staging / "rootfs").mkdir()
                unpack_tarball(download, staging / "rootfs")
        kind = ImageType.raw if raw else ImageType.directory
        return _Filled(kind, expected, spec.url, verification)

    def _fill_from_path(self, spec: ImageSpec, staging: Path) -> _Filled:
        source = self._trusted(Path(spec.path or ""), spec.path or "")
        if source.is_dir():
            if spec.sha256 is not None:
                raise _invalid(
                    "sha256 applies to files (tarballs, raw images); a directory has none"
                )
            (staging / "rootfs").mkdir()
            _copy_tree(source, staging / "rootfs")
            return _Filled(ImageType.directory, None, str(source), "trusted-path")
        if not source.is_file() or not is_raw_name(source.name):
            raise _invalid(
                f"image path {spec.path!r} is neither a directory nor a raw image (.raw, .img)"
            )
        if spec.sha256 is not None:
            check_sha256(source, spec.sha256, str(source))
        check_gpt(source, str(source))
        _copy_file(source, staging / "image.raw")
        verification = "sha256" if spec.sha256 is not None else "trusted-path"
        return _Filled(ImageType.raw, spec.sha256, str(source), verification)

    def _signed_digest(self, url: str, sha256: str | None) -> tuple[str, str]:
        """The sha256 the signed SHA256SUMS beside `url` lists for it, and how it was verified."""
        keys = tuple(self._read_key(p) for p in self.config.trusted_image_keys)
        fetched: dict[str, Path] = {}
        with ExitStack() as stack:
            for name, reason in (
                (SUMS, "ImageChecksumsMissing"),
                (SIGNATURE, "ImageSignatureMissing"),
            ):
                try:
                    fetched[name] = stack.enter_context(self._download(urljoin(url, name), name))
                except ImageError as exc:
                    raise ImageError(f"{name} for {url!r}: {exc.message}", reason=reason) from exc
            filename = unquote(PurePosixPath(urlsplit(url).path).name)
            listed, fingerprint = signed_digest(fetched[SUMS], fetched[SIGNATURE], keys, filename)
        if sha256 is not None and sha256 != listed:
            raise ImageError(
                f"{SUMS} lists sha256 {listed} for {filename!r}, the spec says {sha256}",
                reason="ImageDigestMismatch",
            )
        return listed, f"signature {fingerprint}"

    @staticmethod
    def _read_key(path: Path) -> str:
        try:
            return path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ImageError(
                f"trusted image key {str(path)!r} cannot be read: {exc}", reason="ImageKeyInvalid"
            ) from exc

    def _trusted(self, candidate: Path, shown: str) -> Path:
        """`candidate` resolved (symlinks in the path itself followed) inside a trusted root."""
        if not candidate.is_absolute():
            raise _not_allowed(f"relative path {shown!r}")
        real = Path(os.path.realpath(candidate))
        for root in self.config.trusted_image_paths:
            if real.is_relative_to(Path(os.path.realpath(root))):
                return real
        raise _not_allowed(repr(shown))

    @contextmanager
    def _download(self, url: str, tag: str = "image") -> Iterator[Path]:
        parts = urlsplit(url)
        if parts.scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise _invalid(f"file URL {url!r} must name a local path")
            path = self._trusted(Path(unquote(parts.path)), url)
            if not path.is_file():
                raise _invalid(f"{url!r} does not exist")
            yield path
            return
        if parts.scheme not in ("http", "https"):
            raise _invalid(f"image url scheme {parts.scheme!r}: use http, https or file")
        target = self.root / f".download-{tag}-{os.getpid()}-{threading.get_ident()}"
        try:
            with urllib.request.urlopen(url, timeout=60) as response, target.open("wb") as out:
                _copy_limited(response, out)
            yield target
        except OSError as exc:
            raise ImageError(f"cannot download {url!r}: {exc}", reason="ImageUnreachable") from exc
        finally:
            target.unlink(missing_ok=True)


def _in_use(rootfs: Path) -> bool:
    """Is `rootfs` a lower layer of a mounted overlay (a running machine's root)?"""
    escaped = str(rootfs).replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011")
    options = Path("/proc/self/mountinfo").read_text()
    return any(f"lowerdir={escaped}{end}" in options for end in (",", ":", "\n", " "))


def _copy_limited(src: IO[bytes], dst: IO[bytes]) -> None:
    total = 0
    while chunk := src.read(_CHUNK):
        total += len(chunk)
        if total > MAX_DOWNLOAD_BYTES:
            raise _invalid(f"image download exceeds {MAX_DOWNLOAD_BYTES} bytes")
        dst.write(chunk)


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def _copy_file(source: Path, dest: Path) -> None:
    """A raw image copied sparse (holes stay holes), never through a symlink at `source`."""
    result = subprocess.run(
        ["cp", "--sparse=always", "--no-dereference", "--", str(source), str(dest)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise _invalid(f"cannot copy raw image: {result.stderr.strip()[:500]}")


def _copy_tree(source: Path, dest: Path) -> None:
    """cp -a: ownership, modes, xattrs, hard links; symlinks copied as symlinks, never followed."""
    result = subprocess.run(
        ["cp", "-a", "--no-dereference", "--", f"{source}/.", f"{dest}/"],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise _invalid(f"cannot copy image directory: {result.stderr.strip()[:500]}")


# --- tarballs --------------------------------------------------------------------------------


def _safe_member_name(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\x00" in name:
        raise _invalid(f"tarball member {name!r} leaves the image root")
    return PurePosixPath(*[p for p in path.parts if p != "."])


class _MemberFilter:
    """tarfile extraction filter: refuse traversal, skip device nodes and fifos.

    Links may point anywhere inside the machine (they are resolved there), but nothing is ever
    written below a symlink member, so a link cannot redirect a later member onto the host.
    """

    def __init__(self) -> None:
        self.symlinks: set[PurePosixPath] = set()

    def __call__(self, member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
        rel = _safe_member_name(member.name)
        if any(parent in self.symlinks for parent in rel.parents):
            raise _invalid(f"tarball member {member.name!r} lies below a symlink")
        if member.isdev() or member.isfifo():
            return None
        if member.islnk():
            target = _safe_member_name(member.linkname)
            if target in self.symlinks or any(p in self.symlinks for p in target.parents):
                raise _invalid(f"tarball hard link {member.name!r} goes through a symlink")
        if member.issym():
            self.symlinks.add(rel)
        elif rel in self.symlinks:
            raise _invalid(f"tarball member {member.name!r} replaces a symlink")
        kept = copy.copy(member)  # TarInfo.replace() is 3.11.4+; Debian 12 ships 3.11.2
        kept.name = str(rel) or "."
        return kept


def _zstd_stream(path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["zstd", "-dcq", "--", str(path)], stdout=subprocess.PIPE)


# Our filter has already vetted the member; 3.12+ warns when no filter is named.
_TRUSTED: dict[str, Any] = {"filter": "fully_trusted"} if hasattr(tarfile, "data_filter") else {}


def _extract(tar: tarfile.TarFile, dest: Path) -> None:
    """Every member through _MemberFilter, whether or not this Python has extraction filters
    (3.11.4+; Debian 12's 3.11.2 has none, so the filter is applied member by member)."""
    keep = _MemberFilter()
    for member in tar:
        kept = keep(member, str(dest))
        if kept is not None:
            tar.extract(kept, dest, numeric_owner=True, **_TRUSTED)


def unpack_tarball(tarball: Path, dest: Path) -> None:
    """Unpack a (gz/xz/bz2/zstd-compressed) tar into `dest` with numeric ownership."""
    with tarball.open("rb") as f:
        zstd = f.read(4) == b"\x28\xb5\x2f\xfd"
    try:
        if zstd:
            proc = _zstd_stream(tarball)
            assert proc.stdout is not None
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                _extract(tar, dest)
            if proc.wait() != 0:
                raise _invalid("zstd could not decompress the image tarball")
        else:
            with tarfile.open(tarball, mode="r:*") as tar:
                _extract(tar, dest)
    # A hard link to no member: KeyError (3.11.4+) or ValueError (3.11.2).
    except (tarfile.TarError, EOFError, KeyError, ValueError) as exc:
        raise _invalid(f"image tarball is not a valid tar archive: {exc}") from exc
    except OSError as exc:
        if exc.errno not in (errno.ENAMETOOLONG, errno.EINVAL):
            raise  # the host's problem (disk full, ...), not the archive's
        raise _invalid(f"image tarball has a member this host cannot create: {exc}") from exc
