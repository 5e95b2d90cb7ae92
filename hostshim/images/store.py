"""Base images: root filesystem trees imported once, stored under ImagePaths, never modified.

Sources: a directory under a trusted image path (copied, symlinks kept as symlinks), or a
tarball from file:// (under a trusted path) or http(s):// whose sha256 must match before a
single member is unpacked. Unpacking refuses traversal ('..', absolute names, links that leave
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
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import unquote, urlsplit

from bitbuilder.hostshim.api import ImageSpec, ImageStatus
from bitbuilder.hostshim.config import ShimConfig
from bitbuilder.hostshim.errors import ImageError
from bitbuilder.hostshim.paths import ImagePaths, checked_name

MAX_DOWNLOAD_BYTES = 16 << 30
_CHUNK = 1 << 20


def _not_found(name: str) -> ImageError:
    return ImageError(f"image {name!r} is not imported on this host", reason="ImageNotFound")


def _not_allowed(what: str) -> ImageError:
    return ImageError(
        f"{what} is not under a trusted image path of this shim", reason="ImageSourceNotAllowed"
    )


def _invalid(message: str) -> ImageError:
    return ImageError(message, reason="ImageInvalid")


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
        self._meta(name)
        return ImagePaths(self.config, name).rootfs

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
                (staging / "rootfs").mkdir(parents=True)
                sha, source = self._fill(spec, staging / "rootfs")
                status = ImageStatus(
                    name=name,
                    sha256=sha,
                    size_bytes=_tree_size(staging / "rootfs"),
                    imported_at=datetime.now(UTC),
                    source=source,
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
            raise ImageError(
                f"image {name!r} is the root of running machines: stop them to replace it",
                reason="ImageInUse",
            )
        retired = self.root / f".retired-{name}-{os.getpid()}"
        if final.exists():
            final.rename(retired)
        staging.rename(final)
        shutil.rmtree(retired, ignore_errors=True)

    def _fill(self, spec: ImageSpec, dest: Path) -> tuple[str | None, str]:
        if spec.path is not None:
            if spec.sha256 is not None:
                raise _invalid("sha256 applies to tarballs (url); a directory image has none")
            source = self._trusted(Path(spec.path), spec.path)
            if not source.is_dir():
                raise _invalid(f"image path {spec.path!r} is not a directory")
            _copy_tree(source, dest)
            return None, str(source)
        assert spec.url is not None and spec.sha256 is not None
        with self._download(spec.url) as tarball:
            actual = _sha256_file(tarball)
            if actual != spec.sha256:
                raise ImageError(
                    f"image {spec.url!r} has sha256 {actual}, expected {spec.sha256}",
                    reason="ImageDigestMismatch",
                )
            unpack_tarball(tarball, dest)
        return spec.sha256, spec.url

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
    def _download(self, url: str) -> Iterator[Path]:
        parts = urlsplit(url)
        if parts.scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise _invalid(f"file URL {url!r} must name a local path")
            path = self._trusted(Path(unquote(parts.path)), url)
            if not path.is_file():
                raise _invalid(f"image tarball {url!r} does not exist")
            yield path
            return
        if parts.scheme not in ("http", "https"):
            raise _invalid(f"image url scheme {parts.scheme!r}: use http, https or file")
        target = self.root / f".download-{os.getpid()}-{threading.get_ident()}"
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


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


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
