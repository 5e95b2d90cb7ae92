"""A booted Debian trixie test host: systemd 257 as PID 1 inside `systemd-nspawn --boot`.

Built once with debootstrap, cached as a `tar --zstd` outside the clone (keyed by a hash of
everything that goes into it), restored per session in ~3 s, booted per TESTHOST.md: own
cgroup2 directory, SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1, private network. The host's Python
(the venv and its base interpreter) and the project checkout are bind-mounted read-only at
their own paths, so the project runs inside without network and without installing Python.

CLI for manual use:
    python -m tests.system.testhost build            # make sure the cached tarball exists
    python -m tests.system.testhost shell            # boot one, print how to enter it, wait
    python -m tests.system.testhost run -- CMD ...   # boot, run CMD inside as a unit, tear down
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SUITE = "trixie"
MIRROR = "http://deb.debian.org/debian"
# What the test host needs: systemd with machined/nspawn/networkd, dbus, tools the tests use,
# busybox for tenant images, and the shared libraries the bound-in Python's modules link to.
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "systemd-container",
    "dbus",
    "iproute2",
    "procps",
    "udev",
    "kmod",
    "busybox-static",
    "libssl3t64",
    "libsqlite3-0",
    "libffi8",
    "ca-certificates",  # pygit2 loads the system's CA bundle when imported
    "nftables",  # the shim filters each tenant link
    "libexpat1",  # Debian's python3 binary links it (when that is the bound interpreter)
    "openssh-client",  # ssh-keygen -Y verify: signed host-layer commits are checked inside
)
# Bump when configure() changes: it is part of the cache key.
SCRIPT_VERSION = "6"
CULPRIT_UNITS = (
    # Nothing in the tests needs them and they slow the boot or fail without a network.
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "systemd-timesyncd.service",
)


def _cgroup2_root() -> Path:
    """Where the container's own cgroup directory goes: the hybrid layout's unified part (these
    machines), or the whole tree on a cgroup2-only machine."""
    for candidate in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")):
        if (candidate / "cgroup.controllers").exists():
            return candidate
    return Path("/sys/fs/cgroup/unified")


CGROUP2_ROOT = _cgroup2_root()


@dataclass(frozen=True)
class Flavour:
    """Which Debian a test host is: its suite, packages and cache file (its own prefix and
    lock, so building one flavour neither waits for nor prunes another's tarball)."""

    suite: str
    packages: tuple[str, ...]
    version: str
    prefix: str
    script: str | None = None  # debootstrap's script for a suite it does not know by name
    # What makes the debootstrapped tree this flavour (configure() when None).
    setup: Callable[[Path], None] | None = field(default=None, compare=False)

    def cache_key(self) -> str:
        inputs: dict[str, object] = {
            "suite": self.suite, "packages": self.packages, "version": self.version
        }  # fmt: skip
        if self.script is not None:
            inputs["script"] = self.script
        return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


TRIXIE = Flavour(SUITE, PACKAGES, SCRIPT_VERSION, "testhost")
# VMs: systemd >= 256 has vmspawn (forky: 262), qemu, virtiofsd and firmware to run them.
FORKY = Flavour(
    "forky",
    (*PACKAGES, "qemu-system-x86", "ovmf", "virtiofsd", "iputils-ping"),
    "1",
    "vmhost-forky",
    script="/usr/share/debootstrap/scripts/sid",
)


# A VM guest: a small forky directory image with its own kernel (booted directly, root over
# virtiofs), udev for its devices and networkd for the address the shim gives it; dbus so
# logind takes the ACPI power button (the shim's clean stop); busybox for test services.
GUEST_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "kmod",
    "iproute2",
    "linux-image-amd64",
    "busybox-static",
)
GUEST = Flavour(
    "forky",
    GUEST_PACKAGES,
    "1",
    "vmguest-forky",
    script="/usr/share/debootstrap/scripts/sid",
    setup=lambda root: configure_guest(root),
)


def cache_key(flavour: Flavour = TRIXIE) -> str:
    return flavour.cache_key()


def cache_dir() -> Path:
    return Path(os.environ.get("BITBUILDER_TESTHOST_CACHE", "/var/cache/bitbuilder"))


def tarball_path(flavour: Flavour = TRIXIE) -> Path:
    return cache_dir() / f"{flavour.prefix}-{flavour.cache_key()}.tar.zst"


def missing_prerequisites() -> list[str]:
    """Why this machine cannot build or boot a test host (empty when it can)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not root")
    for tool in ("debootstrap", "systemd-nspawn", "nsenter", "zstd", "tar"):
        if shutil.which(tool) is None:
            problems.append(f"{tool} missing")
    if (
        not (CGROUP2_ROOT / "cgroup.procs").exists()
        and not Path("/sys/fs/cgroup/cgroup.procs").exists()
    ):
        problems.append("no cgroup2 hierarchy")
    return problems


def ensure_tarball(log: Path | None = None, flavour: Flavour = TRIXIE) -> Path:
    """The cached root tarball, built under a lock if it does not exist yet."""
    target = tarball_path(flavour)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{flavour.prefix}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as work:
            root = Path(work) / "root"
            build_root(root, log, flavour)
            partial = Path(work) / "root.tar.zst"
            subprocess.run(
                ["tar", "--zstd", "--numeric-owner", "--xattrs", "-C", root, "-cf", partial, "."],
                check=True,
            )
            partial.rename(target)
        for stale in target.parent.glob(f"{flavour.prefix}-*.tar.zst"):
            if stale != target:
                stale.unlink()  # built from older inputs: never used again
    return target


def build_root(root: Path, log: Path | None = None, flavour: Flavour = TRIXIE) -> None:
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    script = [flavour.script] if flavour.script else []
    try:
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=" + ",".join(flavour.packages),
                flavour.suite,
                str(root),
                MIRROR,
                *script,
            ],
            check=True,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    finally:
        if log:
            out.close()  # type: ignore[union-attr]
    (flavour.setup or configure)(root)


def configure(root: Path) -> None:
    """Make the debootstrapped tree boot quickly and identically every time."""
    (root / "etc/machine-id").write_text("")
    (root / "etc/hostname").write_text("bb-testhost\n")
    # Raw extension images need loop devices; binding the machine's nodes breaks (systemd
    # removes them after probing), so they are created inside from /dev/loop-control.
    (root / "etc/tmpfiles.d/loop.conf").write_text(
        "".join(f"b /dev/loop{n} 0660 root disk - 7:{n}\n" for n in range(8))
    )
    systemctl = ["systemctl", "--quiet", f"--root={root}"]
    subprocess.run([*systemctl, "enable", "systemd-networkd.service"], check=True)
    # No getty on the read-only console either.
    subprocess.run([*systemctl, "mask", *CULPRIT_UNITS, "console-getty.service"], check=True)
    shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True)


def configure_guest(root: Path) -> None:
    """A guest that boots the same every time: empty machine-id (a fresh one per boot), networkd
    on, nothing that waits for a network or a terminal it will never have."""
    (root / "etc/machine-id").write_text("")
    (root / "etc/hostname").write_text("bb-guest\n")
    (root / "etc/apt/apt.conf.d/10-valid-until").write_text('Acquire::Check-Valid-Until "false";\n')
    systemctl = ["systemctl", "--quiet", f"--root={root}"]
    subprocess.run([*systemctl, "enable", "systemd-networkd.service"], check=True)
    subprocess.run([*systemctl, "mask", *CULPRIT_UNITS, "getty@tty1.service"], check=True)
    shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True)


def restore_tree(tarball: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    subprocess.run(
        ["tar", "--zstd", "--numeric-owner", "--xattrs", "-C", dest, "-xpf", tarball], check=True
    )


# The test host has its own of these: binding one over it would replace its system.
SYSTEM_PREFIXES = (Path("/"), Path("/usr"), Path("/usr/local"))


def _symlink_chain(path: Path) -> list[Path]:
    """`path` and every link it goes through to the real file (each as a path to bind)."""
    chain = [path]
    while path.is_symlink():
        path = path.parent / os.readlink(path)
        chain.append(path)
    return chain


def python_binds() -> list[Path]:
    """What the project needs from this machine inside the test host: its venv, the base
    interpreter, and the checkout (an editable install points there).

    A base interpreter under its own prefix (pyenv, /opt/python) is bound whole. Debian's own
    python3 lives in /usr: then only its binary (with the links the venv reaches it by) and its
    standard library are bound; its shared libraries come from the test host's packages."""
    import bitbuilder.hostshim

    checkout = Path(bitbuilder.hostshim.__file__).resolve().parents[1]
    venv = Path(sys.prefix).resolve()
    paths = {venv, checkout}
    base = Path(sys.base_prefix).resolve()
    if base in SYSTEM_PREFIXES:
        executable = Path(sys.prefix) / "bin" / Path(sys.executable).name
        paths.update(p for p in _symlink_chain(executable) if venv not in p.parents)
        paths.add(Path(sysconfig.get_path("stdlib")).resolve())
    else:
        paths.add(base)
    # A nested path is covered by its parent's bind.
    return sorted(p for p in paths if not any(q != p and q in p.parents for q in paths))


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The comm field may contain spaces; the fields after its closing ')' are fixed.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


@dataclass
class TestHost:
    """One booted test host. Use as a context manager, or boot()/destroy()."""

    __test__ = False  # not a pytest test class despite its name

    root: Path
    name: str = field(default_factory=lambda: f"bbth-{uuid.uuid4().hex[:8]}")
    binds_ro: list[Path] = field(default_factory=python_binds)
    binds_rw: list[Path] = field(default_factory=list)
    console_log: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    leader: int | None = None

    @property
    def cgroup(self) -> Path:
        return CGROUP2_ROOT / self.name

    def boot(self, timeout: float = 90.0) -> None:
        """Start systemd in the root and wait until it reports running (or degraded)."""
        self.cgroup.mkdir(exist_ok=True)
        procs = str(self.cgroup / "cgroup.procs")
        argv = [
            "systemd-nspawn",
            "--register=no",
            "--keep-unit",
            "-q",
            "-b",
            "-D",
            str(self.root),
            "-M",
            self.name,
            "--console=read-only",
            "--private-network",
            "--bind=/dev/loop-control",
            *(f"--bind-ro={p}" for p in self.binds_ro),
            *(f"--bind={p}" for p in self.binds_rw),
        ]
        env = {**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        log = open(self.console_log, "ab") if self.console_log else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # The container's cgroup subtree is its own, never the test runner's.
                preexec_fn=lambda: Path(procs).write_text("0"),
            )
        finally:
            if self.console_log:
                log.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        self.leader = self._wait(self._find_leader, deadline, "the container's systemd")
        self._wait(self._is_up, deadline, "is-system-running")

    def _wait(self, probe: object, deadline: float, what: str) -> int:
        assert callable(probe)
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"test host exited ({self.process.returncode}) before {what}")
            result = probe()
            if result:
                return int(result)
            if time.monotonic() > deadline:
                raise TimeoutError(f"test host {self.name}: no {what} in time")
            time.sleep(0.1)

    def _find_leader(self) -> int | None:
        assert self.process is not None
        for child in _children(self.process.pid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return child
        return None

    def _is_up(self) -> bool:
        state = self.enter("systemctl", "is-system-running", check=False).stdout.strip()
        return state in ("running", "degraded")

    def enter(
        self, *argv: str, check: bool = True, timeout: float = 60.0, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command in the host's namespaces (not as a unit): for reading state."""
        assert self.leader is not None, "boot() first"
        return self._exec(["nsenter", "-t", str(self.leader), "-a", *argv], check, timeout, input)

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = 120.0,
        input: str | None = None,
        properties: Sequence[str] = (),
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside as a proper transient service; its exit code passes through."""
        unit = [
            "systemd-run",
            "--pipe",
            "--wait",
            "--collect",
            "--quiet",
            "--service-type=exec",
            *(f"--property={p}" for p in properties),
            "--",
            *argv,
        ]
        return self.enter(*unit, check=check, timeout=timeout, input=input)

    @staticmethod
    def _exec(
        argv: list[str], check: bool, timeout: float, input: str | None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(
                result.returncode, argv, result.stdout, result.stderr
            )
        return result

    def poweroff(self, timeout: float = 60.0) -> None:
        """A clean shutdown: SIGTERM to nspawn makes systemd power off."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None
        self.leader = None
        self._remove_cgroup()

    def reboot(self, timeout: float = 90.0) -> None:
        """Power off and boot the same root again (state on its disk survives)."""
        self.poweroff()
        self.boot(timeout)

    def _remove_cgroup(self) -> None:
        if not self.cgroup.exists():
            return
        kill = self.cgroup / "cgroup.kill"
        with contextlib.suppress(OSError):
            kill.write_text("1")
        deadline = time.monotonic() + 10
        while True:
            # Remove the deepest directories first; each must be empty of processes.
            for sub in sorted(self.cgroup.rglob("*"), key=lambda p: -len(p.parts)):
                if sub.is_dir():
                    with contextlib.suppress(OSError):
                        sub.rmdir()
            try:
                self.cgroup.rmdir()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def destroy(self) -> None:
        """Power off (or kill) and remove the cgroup; the root itself is the caller's."""
        self.poweroff()

    def __enter__(self) -> TestHost:
        try:
            self.boot()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def link_tmp(root: Path) -> None:
    """Make the root's /tmp a symlink to /var/tmp, so paths bound under /tmp stay visible to
    generators.

    systemd (>= 254) runs generators in a mount namespace with a fresh tmpfs over /tmp, but
    only when /tmp is a directory. A checkout bound under /tmp (a CI clone) would be hidden
    there: the project's generator could not import the package and no tenant came back after
    a reboot. nspawn follows the link: its tmpfs and the binds land under /var/tmp and show
    at their own /tmp paths."""
    shutil.rmtree(root / "tmp")  # forky's packages leave .X11-unix and friends there
    (root / "tmp").symlink_to("var/tmp")


def _assert_nothing_mounted_under(path: Path) -> None:
    text = Path("/proc/self/mountinfo").read_text()
    prefix = str(path.resolve())
    for line in text.splitlines():
        mount_point = line.split()[4]
        if mount_point == prefix or mount_point.startswith(prefix + "/"):
            raise RuntimeError(f"refusing to delete {path}: {mount_point} is mounted")


@contextlib.contextmanager
def restored_root(workdir: Path | None = None, flavour: Flavour = TRIXIE) -> Iterator[Path]:
    """A fresh test-host root from the cached tarball, deleted afterwards."""
    tarball = ensure_tarball(flavour=flavour)
    base = Path(tempfile.mkdtemp(prefix="bb-testhost-", dir=workdir or "/var/tmp"))
    root = base / "root"
    try:
        restore_tree(tarball, root)
        link_tmp(root)
        yield root
    finally:
        _assert_nothing_mounted_under(base)
        subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="testhost", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build the cached root tarball if missing, print its path")
    sub.add_parser("shell", help="boot a test host and wait (Ctrl-C tears it down)")
    run = sub.add_parser("run", help="boot, run a command inside as a unit, tear down")
    run.add_argument("argv", nargs="+")
    flavours = {"trixie": TRIXIE, "forky": FORKY, "guest": GUEST}
    parser.add_argument("--flavour", choices=sorted(flavours), default="trixie")
    args = parser.parse_args(argv)
    flavour = flavours[args.flavour]
    problems = missing_prerequisites()
    if problems:
        print("cannot build a test host: " + ", ".join(problems), file=sys.stderr)
        return 2
    if args.command == "build":
        print(ensure_tarball(flavour=flavour))
        return 0
    with restored_root(flavour=flavour) as root, TestHost(root) as host:
        if args.command == "run":
            result = host.run(*args.argv, check=False)
            sys.stdout.write(result.stdout)
            sys.stderr.write(result.stderr)
            return result.returncode
        print(f"test host {host.name} up; enter with: nsenter -t {host.leader} -a bash")
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
