"""Our extension-release rules say exactly what systemd-sysext/-confext 257 say.

Each case is merged for real with `systemd-{sysext,confext} --root=DIR merge` in the booted
test host (an OS tree with the case's os-release and one extension directory) and compared
with `extrelease.incompatibility()` for the same texts.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bitbuilder.hostshim.api import ExtensionType
from bitbuilder.hostshim.source.extrelease import incompatibility, parse_os_release
from tests.system.testhost import TestHost

SYS, CONF = ExtensionType.sysext, ExtensionType.confext
DEB13 = "ID=debian\nVERSION_ID=13\n"
CASES: list[tuple[ExtensionType, str, str | None]] = [
    (SYS, DEB13, "ID=debian\nVERSION_ID=13\n"),
    (SYS, DEB13, "ID=debian\nVERSION_ID=12\n"),
    (SYS, DEB13, "ID=fedora\n"),
    (SYS, DEB13, "ID=_any\n"),
    (SYS, DEB13, "ID=debian\n"),
    (SYS, DEB13, "VERSION_ID=13\n"),
    (SYS, DEB13, None),
    (SYS, DEB13 + "SYSEXT_LEVEL=2\n", "ID=debian\nSYSEXT_LEVEL=2\n"),
    (SYS, DEB13 + "SYSEXT_LEVEL=2\n", "ID=debian\nSYSEXT_LEVEL=3\nVERSION_ID=13\n"),
    (SYS, DEB13 + "SYSEXT_LEVEL=2\n", "ID=debian\nVERSION_ID=13\n"),
    (SYS, "ID=debian\nSYSEXT_LEVEL=2\n", "ID=debian\n"),
    (SYS, "ID=debian\n", "ID=debian\nVERSION_ID=13\n"),
    (SYS, "ID=ubuntu\nID_LIKE=debian\nVERSION_ID=24\n", "ID=debian\nVERSION_ID=24\n"),
    (SYS, DEB13, DEB13 + "ARCHITECTURE=arm64\n"),
    (SYS, DEB13, DEB13 + "ARCHITECTURE=x86-64\n"),
    (SYS, DEB13, "ID=_any\nARCHITECTURE=arm64\n"),
    (SYS, DEB13, DEB13 + "SYSEXT_SCOPE=portable\n"),
    (SYS, DEB13, DEB13 + "SYSEXT_SCOPE=system portable\n"),
    (SYS, DEB13, '"ID=debian"\nVERSION_ID="13"\n'),
    (CONF, DEB13, DEB13),
    (CONF, DEB13, None),
    (CONF, DEB13 + "CONFEXT_LEVEL=1\n", "ID=debian\nCONFEXT_LEVEL=2\nVERSION_ID=13\n"),
    (CONF, DEB13 + "SYSEXT_LEVEL=1\n", "ID=debian\nSYSEXT_LEVEL=2\nVERSION_ID=13\n"),
    (CONF, DEB13, DEB13 + "CONFEXT_SCOPE=initrd\n"),
]

# One case: an OS tree at $1 with os-release $3, one extension whose release file is $4 (absent
# when $4 is "-"); prints MERGED or REFUSED.
PROBE = r"""
set -eu
kind=$1 root=$2
mkdir -p "$root/usr/lib" "$root/etc" "$root/var/lib/extensions/ext" "$root/var/lib/confexts/ext"
cp "$3" "$root/usr/lib/os-release"
if [ "$kind" = sysext ]; then
  ext="$root/var/lib/extensions/ext" rel=usr/lib/extension-release.d top=usr
else
  ext="$root/var/lib/confexts/ext" rel=etc/extension-release.d top=etc
fi
mkdir -p "$ext/$rel"
[ "$4" = - ] || cp "$4" "$ext/$rel/extension-release.ext"
echo marker > "$ext/$top/bb-marker"
systemd-$kind --root="$root" merge >/dev/null 2>&1 || true
if [ -e "$root/$top/bb-marker" ]; then echo MERGED; else echo REFUSED; fi
systemd-$kind --root="$root" unmerge >/dev/null 2>&1 || true
"""


@pytest.fixture(scope="module")
def real_verdicts(testhost: TestHost, shared_dir: Path) -> list[bool]:
    work = shared_dir / "extension-release"
    work.mkdir()
    (work / "probe.sh").write_text(PROBE)
    lines = []
    for index, (kind, os_release, release) in enumerate(CASES):
        (work / f"{index}.os").write_text(os_release)
        if release is not None:
            (work / f"{index}.ext").write_text(release)
        ext = str(work / f"{index}.ext") if release is not None else "-"
        root = f"/var/tmp/sysext-case-{index}"
        lines.append(f"sh {work}/probe.sh {kind} {root} {work}/{index}.os {ext}")
    out = testhost.run("sh", "-c", "\n".join(lines)).stdout.split()
    assert len(out) == len(CASES), out
    return [verdict == "MERGED" for verdict in out]


@pytest.mark.parametrize("index", range(len(CASES)))
def test_same_verdict_as_systemd(real_verdicts: list[bool], index: int) -> None:
    kind, os_release, release = CASES[index]
    parsed = parse_os_release(release) if release is not None else None
    # this machine's architecture, as systemd
    reason = incompatibility(kind, parsed, parse_os_release(os_release))
    assert (reason is None) == real_verdicts[index], (CASES[index], reason)
