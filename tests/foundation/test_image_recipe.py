"""The host image recipe (image/, mkosi) agrees with what the project ships.

It is not built here (this machine's mkosi is too old); these checks catch the drift a build
would only show on a booted host: a shipped unit the image never enables, a partition the
first-boot repart definitions would not recognise, /usr without verity.
"""

from __future__ import annotations

import configparser
from pathlib import Path

from bitbuilder.hostshim.systemd import install
from tests.foundation.conftest import REPO

IMAGE = REPO / "image"


def _partition(path: Path) -> dict[str, str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return dict(parser["Partition"])


def test_every_shipped_unit_with_an_install_section_is_enabled_by_the_image() -> None:
    preset = (IMAGE / "mkosi.extra/usr/lib/systemd/system-preset/10-bitbuilder.preset").read_text()
    enabled = {line.split()[1] for line in preset.splitlines() if line.startswith("enable ")}
    installable = {u for u in install.UNITS if "[Install]" in install.shipped_unit(u)}
    assert installable and installable <= enabled
    assert {"systemd-networkd.service", "systemd-importd.service"} <= enabled
    assert {"systemd-machined.service", "systemd-sysext.service"} <= enabled


def test_usr_is_verity_protected_and_first_boot_repart_matches_the_image() -> None:
    built = {p.name: _partition(p) for p in sorted((IMAGE / "mkosi.repart").glob("*.conf"))}
    at_boot = {
        p.name: _partition(p)
        for p in sorted((IMAGE / "mkosi.extra/usr/lib/repart.d").glob("*.conf"))
    }
    assert built["10-usr.conf"]["Verity"] == "data"
    assert built["10-usr.conf"]["Format"] == "erofs"
    assert {p["Type"] for p in built.values()} == {"esp", "usr", "usr-verity", "usr-verity-sig"}
    assert "root" not in {p["Type"] for p in built.values()}  # /etc and /var start empty
    for name, partition in built.items():
        matching = at_boot[name]
        assert matching["Type"] == partition["Type"]
        assert matching.get("Label") == partition.get("Label"), name
    assert at_boot["40-root.conf"]["Type"] == "root"


def test_the_build_signs_its_checksums() -> None:
    config = (IMAGE / "mkosi.conf").read_text()
    for setting in (
        "Checksum=yes",
        "Sign=yes",
        "Bootloader=systemd-boot",
        "UnifiedKernelImages=yes",
    ):
        assert setting in config.splitlines()
