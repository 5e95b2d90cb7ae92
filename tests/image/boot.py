"""Boot the built host image under qemu and wait for a line on its serial console.

UEFI firmware (OVMF) → systemd-boot → the UKI → the image's own initrd, which lets
systemd-repart create the root partition, sets up dm-verity for /usr and switches to the host.
qemu and the firmware come from the mkosi builder root (tests/image/build.py), run as a plain
`systemd-nspawn` command (no KVM: TCG). The disk is a sparse copy of the cached image, grown
so that the root partition fits; the cached build is never written.

Two probe units reach the booted host as systemd credentials in SMBIOS strings
(`systemd.extra-unit.*`, read by systemd-debug-generator, systemd >= 256) and a drop-in passed
the same way (`systemd.unit-dropin.*`) makes multi-user.target want them: nothing test-only is
in the image. The first asks the shim on its socket and prints MARKER, whether /usr is
read-only, the reply's status line and body to the console; the second merges the BitBuilder
sysext (a second, read-only disk) and prints SYSEXT_MARKER and whether it was merged.

    python -m tests.image.boot        # boot the cached image; the serial console on stdout
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.image.build import (
    BUILDER_ENV,
    BUILDER_MOUNT,
    IMAGE,
    SYSEXT,
    builder_root,
    ensure_image,
    in_builder_argv,
)

MARKER = "BITBUILDER-BOOT-PROBE"
PROBE_UNIT = "bitbuilder-boot-probe.service"
# One HTTP/1.0 request on the shim's socket (systemd holds it: the request waits while the
# shim starts); no quoting or backslash that systemd's ExecStart= parser would change.
PROBE = f"""[Unit]
Description=Ask the BitBuilder shim on its socket (boot test)
ConditionPathExists=!/etc/initrd-release
Requires=bitbuilder-hostshim.socket
After=bitbuilder-hostshim.socket

[Service]
Type=oneshot
StandardOutput=journal+console
ExecStart=/usr/bin/python3 -I -c "import os, socket; s = socket.socket(socket.AF_UNIX); \\
s.connect('/run/bitbuilder/hostshim.sock'); \\
s.sendall(b'GET /v1/machines HTTP/1.0' + bytes((13, 10, 13, 10))); \\
reply = s.makefile('rb').read().decode(errors='replace').splitlines(); \\
usr_ro = bool(os.statvfs('/usr').f_flag & os.ST_RDONLY); \\
print('{MARKER}', 'usr-ro=' + str(usr_ro), reply[0], reply[-1], flush=True)"
"""
SYSEXT_MARKER = "BITBUILDER-BOOT-SYSEXT"
SYSEXT_UNIT = "bitbuilder-boot-sysext.service"
# After the shim answered: the BitBuilder sysext (a read-only virtio disk) merged over /usr
# the way a host takes one (systemd-sysext from /run/extensions); prints SYSEXT_MARKER and
# `merged` if its extension-release is then in /usr.
SYSEXT_PROBE = f"""[Unit]
Description=Merge the BitBuilder sysext (boot test)
ConditionPathExists=!/etc/initrd-release
After={PROBE_UNIT}

[Service]
Type=oneshot
StandardOutput=journal+console
StandardError=journal+console
ExecStart=/usr/bin/mkdir -p /run/extensions
ExecStart=/usr/bin/cp /dev/disk/by-id/virtio-bitbuilder-sysext /run/extensions/bitbuilder.raw
ExecStart=-/usr/bin/systemd-sysext refresh
ExecStart=/usr/bin/sh -c 'test -e /usr/lib/extension-release.d/extension-release.bitbuilder \\
&& echo {SYSEXT_MARKER} merged || echo {SYSEXT_MARKER} not-merged'
"""
START = "systemd.unit-dropin.multi-user.target~bitbuilder-boot-probe"
# The shim's own output on the console too: a failing boot shows why.
SHIM_LOGS = "systemd.unit-dropin.bitbuilder-hostshim.service~bitbuilder-boot-probe"
CONSOLE = "[Service]\nStandardOutput=journal+console\nStandardError=journal+console\n"
DISK_SIZE = 8 << 30  # ESP, /usr, verity, signature and the 4G root that repart makes
FIRMWARE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
FIRMWARE_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"


def credential(name: str, value: str) -> str:
    encoded = base64.b64encode(value.encode()).decode()
    return f"type=11,value=io.systemd.credential.binary:{name}={encoded}"


def qemu_argv(disk: str, sysext: str, vars_file: str, serial_log: str) -> list[str]:
    """The qemu command line (paths as seen by qemu): 2 CPUs, 2G, TCG, no display, the host
    image and the sysext as virtio disks, serial console to a file; the probe units, the
    drop-in that starts them and one that copies the shim's output to the console as SMBIOS
    strings."""
    return [
        "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", "max",
        "-smp", "2", "-m", "2G", "-nodefaults", "-display", "none", "-no-reboot",
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={FIRMWARE}",
        "-drive", f"if=pflash,format=raw,unit=1,file={vars_file}",
        "-drive", f"if=virtio,format=raw,file={disk}",
        "-drive", f"if=none,id=sysext,format=raw,readonly=on,file={sysext}",
        "-device", "virtio-blk-pci,drive=sysext,serial=bitbuilder-sysext",
        "-serial", f"file:{serial_log}",
        "-smbios", credential(f"systemd.extra-unit.{PROBE_UNIT}", PROBE),
        "-smbios", credential(f"systemd.extra-unit.{SYSEXT_UNIT}", SYSEXT_PROBE),
        "-smbios", credential(START, f"[Unit]\nWants={PROBE_UNIT} {SYSEXT_UNIT}\n"),
        "-smbios", credential(SHIM_LOGS, CONSOLE),
    ]  # fmt: skip


def grown_copy(root: Path, image: Path, scratch: Path) -> str:
    """A sparse copy of `image` in `scratch`, grown by systemd-repart (which moves the backup
    GPT to the new end, as truncating alone would not); returns its path seen from qemu."""
    subprocess.run(["cp", "--sparse=always", str(image), str(scratch / "disk.raw")], check=True)
    (scratch / "no-definitions").mkdir()
    subprocess.run(
        in_builder_argv(root, f"--bind={scratch}:{BUILDER_MOUNT}", "systemd-repart",
                        f"--definitions={BUILDER_MOUNT}/no-definitions", f"--size={DISK_SIZE}",
                        "--dry-run=no", "--offline=yes", f"{BUILDER_MOUNT}/disk.raw"),
        env=BUILDER_ENV, stdin=subprocess.DEVNULL, capture_output=True, check=True, timeout=120,
    )  # fmt: skip
    return f"{BUILDER_MOUNT}/disk.raw"


class Boot:
    """A running qemu: its serial log, read as it grows."""

    def __init__(self, process: subprocess.Popen[bytes], serial_log: Path, started: float):
        self.process = process
        self.serial_log = serial_log
        self.started = started

    def console(self) -> str:
        return self.serial_log.read_text(errors="replace") if self.serial_log.exists() else ""

    def wait_for(self, text: str, timeout: float) -> float:
        """Seconds from qemu's start until `text` is on the console; TimeoutError if it is not
        there within `timeout` or qemu stops first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.console():
                return time.monotonic() - self.started
            if self.process.poll() is not None:
                said = (self.serial_log.parent / "qemu.log").read_text(errors="replace")
                code = self.process.returncode
                raise TimeoutError(f"qemu exited ({code}) before {text!r}: {said}")
            time.sleep(1)  # polling a file qemu appends to: no event to wait on
        raise TimeoutError(f"{text!r} not on the console within {timeout:.0f} s")


@contextmanager
def booted(built: Path, scratch: Path) -> Iterator[Boot]:
    """qemu booting a copy of `built`'s image in `scratch`; stopped (and its container gone)
    when the block ends, whatever happened."""
    root = builder_root(built / "build.log")
    disk = grown_copy(root, built / "out" / IMAGE, scratch)
    shutil.copy(root / FIRMWARE_VARS.lstrip("/"), scratch / "vars.fd")
    shutil.copy(built / "out" / SYSEXT, scratch / SYSEXT)
    argv = qemu_argv(
        disk, f"{BUILDER_MOUNT}/{SYSEXT}", f"{BUILDER_MOUNT}/vars.fd", f"{BUILDER_MOUNT}/serial.log"
    )
    # Not booted: nspawn answers SIGTERM by killing the container (qemu is its PID 1).
    with open(scratch / "qemu.log", "wb") as log:  # qemu's own complaints
        process = subprocess.Popen(
            in_builder_argv(root, f"--bind={scratch}:{BUILDER_MOUNT}", *argv), env=BUILDER_ENV,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield Boot(process, scratch / "serial.log", time.monotonic())
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> None:
    built = ensure_image()
    with tempfile.TemporaryDirectory(dir=built.parent) as tmp, booted(built, Path(tmp)) as boot:
        try:
            print(f"{MARKER} after {boot.wait_for(MARKER, 1800):.0f} s")
        finally:
            sys.stdout.write(boot.console())


if __name__ == "__main__":
    main()
