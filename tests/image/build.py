"""The host image built from image/ with mkosi, cached by its inputs.

This machine's mkosi (Debian 12's 14) is too old, so the build runs in a trixie root that has
mkosi 25 (debootstrapped once, cached like the test host), as a plain `systemd-nspawn` command
with this machine's network: mkosi fetches the image's packages from the Debian mirror. The
output folder is kept under the cache dir, keyed by a hash of the recipe and of the project's
sources, so an unchanged tree is never built twice.

    python -m tests.image.build        # build (or find) the image, print its folder
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.system.testhost import MIRROR, SUITE, cache_dir

REPO = Path(__file__).resolve().parents[2]
# mkosi and what it runs to make a verity-protected DDI with a UKI, and qemu with UEFI firmware
# to boot it (tests/image/boot.py); debootstrap resolves no virtual packages, hence dbus and
# python3-cffi-backend by name.
BUILDER_PACKAGES = (
    "mkosi", "dbus", "python3-cffi-backend", "systemd", "systemd-container", "systemd-repart",
    "systemd-ukify", "systemd-boot-efi", "erofs-utils", "dosfstools", "mtools",
    "cryptsetup-bin", "gnupg", "python3-pip", "ca-certificates", "qemu-system-x86", "ovmf",
)  # fmt: skip
# Only the suites the mirror serves (mkosi would add trixie-debug too).
APT_SOURCES = f"""Types: deb
URIs: {MIRROR}
Suites: {SUITE} {SUITE}-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://security.debian.org/debian-security
Suites: {SUITE}-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
BUILD_SCRIPT = """set -eu
export GNUPGHOME=/work/gnupg
mkdir -p -m 700 "$GNUPGHOME"
gpg --batch --passphrase '' --quick-gen-key 'BitBuilder image test <image@example.invalid>' \\
    ed25519 sign never
FPR=$(gpg --with-colons --list-secret-keys | awk -F: '/^fpr/ {print $10; exit}')
gpg --armor --export "$FPR" > /work/signing-key.asc
cd /work/src/image
mkosi genkey
mkosi --key="$FPR" --output-directory=/work/out -f build
"""
IMAGE = "bitbuilder-host_0.1.0.raw"
STUB_README = "BitBuilder Hypervisor: see README.md in the project's repository.\n"
SYSEXT = "bitbuilder.raw"  # BitBuilder alone, a sysext of IMAGE (image/sysext/build)


def _digest(paths: list[Path]) -> str:
    sha = hashlib.sha256()
    for path in sorted(paths):
        sha.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return sha.hexdigest()[:16]


def inputs() -> list[Path]:
    """What goes into the image: the recipe, the packaging and the project's sources. Not the
    README (the package's long description gets STUB_README), so editing it builds nothing."""
    found = [REPO / "pyproject.toml"]
    for folder in ("image", "hostshim", "operator"):
        found += [
            p for p in (REPO / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts
        ]
    return found


def _nspawn(root: Path, work: Path, script: str, log: Path) -> None:
    with open(log, "ab") as out:
        subprocess.run(
            ["systemd-nspawn", "--register=no", "--keep-unit", "-q", "-D", str(root),
             f"--bind={work}:/work", "--capability=all",
             "--system-call-filter=@mount @privileged @keyring", "sh", "-c", script],
            env={**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"},
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, check=True,
        )  # fmt: skip


def in_builder_argv(root: Path, *options: str) -> list[str]:
    """A plain command in the builder root (`options`: more nspawn options, binds). Read-only,
    so that inspections and boots may share the root; only a build writes it."""
    return ["systemd-nspawn", "--register=no", "--keep-unit", "-q", "--read-only",
            "--tmpfs=/tmp", "-D", str(root), *options]  # fmt: skip


# Where inspections and boots bind their folder in the builder root: one every Debian root has,
# since nspawn cannot make a new mount point in a root it mounts read-only.
BUILDER_MOUNT = "/mnt"
# nspawn refuses to start without it on this machine's hybrid cgroup layout.
BUILDER_ENV = {"SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


def builder_root(log: Path) -> Path:
    key = hashlib.sha256(repr((SUITE, BUILDER_PACKAGES)).encode()).hexdigest()[:16]
    root = cache_dir() / f"mkosi-{key}"
    if (root / "usr/bin/mkosi").exists():
        return root
    partial = Path(tempfile.mkdtemp(prefix=".mkosi-", dir=cache_dir()))
    with open(log, "ab") as out:
        subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=" + ",".join(BUILDER_PACKAGES),
             SUITE, str(partial / "root"), MIRROR],
            stdout=out, stderr=subprocess.STDOUT, check=True,
        )  # fmt: skip
    (partial / "root").rename(root)
    partial.rmdir()
    return root


def ensure_image(log: Path | None = None) -> Path:
    """The folder with the built image, its split partitions, UKI, SHA256SUMS(.gpg) and the
    public key that signed them (signing-key.asc); built under a lock when missing."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"hostimage-{_digest(inputs())}"
    with open(cache / ".hostimage.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "out" / IMAGE).exists():
            return target
        log = log or cache / "hostimage-build.log"
        root = builder_root(log)
        work = Path(tempfile.mkdtemp(prefix=".hostimage-", dir=cache))
        try:
            shutil.copytree(REPO / "image", work / "src" / "image")
            for name in ("hostshim", "operator"):
                shutil.copytree(REPO / name, work / "src" / name)
            shutil.copy2(REPO / "pyproject.toml", work / "src")
            (work / "src" / "README.md").write_text(STUB_README)
            sources = work / "src/image/mkosi.sandbox/etc/apt/sources.list.d"
            sources.mkdir(parents=True)
            (sources / "mkosi.sources").write_text(APT_SOURCES)
            _nspawn(root, work, BUILD_SCRIPT, log)
            shutil.rmtree(work / "src")
            shutil.rmtree(work / "gnupg", ignore_errors=True)
            for stale in cache.glob("hostimage-*"):
                if stale.is_dir():
                    shutil.rmtree(stale)  # built from older inputs: never used again
            work.rename(target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


if __name__ == "__main__":
    print(ensure_image(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
