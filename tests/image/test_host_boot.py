"""The built host image boots under qemu (TCG) and its shim answers on its socket.

One boot: UEFI → systemd-boot → UKI → the image's initrd (systemd-repart makes the root
partition, dm-verity guards /usr) → the host, where a probe unit passed as a credential asks
the shim for its machines, and a second one merges the BitBuilder sysext, read from a second
disk, the way a host takes it (tests/image/boot.py). The time from qemu's start to the shim's
answer is printed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.helpers.needs import needs_root_and
from tests.image.boot import MARKER, SYSEXT_MARKER, booted

pytestmark = [
    pytest.mark.slow,
    pytest.mark.nspawn,
    pytest.mark.timeout(2400),
    needs_root_and("debootstrap", "systemd-nspawn"),
]
BOOT_DEADLINE = 900.0  # TCG on 2 busy cores; an idle machine needs a fraction of it


def test_the_image_boots_and_the_shim_answers_on_its_socket(
    built: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    scratch = tmp_path_factory.mktemp("boot")
    with booted(built, scratch) as boot:
        try:
            seconds = boot.wait_for(MARKER, BOOT_DEADLINE)
            boot.wait_for(SYSEXT_MARKER, BOOT_DEADLINE - seconds)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; console:\n{boot.console()[-6000:]}") from exc
        console = boot.console()
    print(f"qemu start → shim answered: {seconds:.0f} s")
    console = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", console)  # systemd's colours
    [answer] = re.findall(rf"{MARKER} (.*)", console)
    status = re.match(r"usr-ro=True HTTP/1\.[01] 200 OK (.*)", answer)
    assert status, answer
    assert json.loads(status[1])["items"] == [], answer  # no tenant on a fresh host
    # In the initrd: dm-verity set up for /usr, the root partition made at this first boot.
    assert "Finished systemd-veritysetup@usr" in console  # the name is cut to fit 80 columns
    assert "Finished systemd-repart.service" in console
    # BitBuilder's sysext merged over the image's /usr by systemd-sysext.
    assert f"{SYSEXT_MARKER} merged" in console
