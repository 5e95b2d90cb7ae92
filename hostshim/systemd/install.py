"""`bitbuilder-hostshim-install`: put the shim's units and boot-time generator on this host.

- the unit files shipped in the package (hostshim/units/) go to --unit-dir;
- a .network file telling networkd to leave the tenant links to the shim (systemd/networkd.py);
- the generator is written to --generator-dir as a two-line script run by this interpreter;
- the units call `bitbuilder-hostshim` through systemd's fixed executable search path, so
  when it is not found there (a virtualenv install) a symlink goes to /usr/local/bin.
Then `systemctl daemon-reload`, and with --enable the socket and the service are enabled and
started. Idempotent: running it again rewrites the same files.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from bitbuilder.hostshim.config import DEFAULT_STATE_DIR
from bitbuilder.hostshim.systemd import networkd, systemctl

GENERATOR_NAME = "bitbuilder-hostshim-generator"
# The commands the units run.
ENTRY_POINTS = (
    "bitbuilder-hostshim", "bitbuilder-hostshim-restore", "bitbuilder-hostshim-host-restore"
)  # fmt: skip
# What systemd searches for a unit's non-absolute ExecStart= binary (systemd.service(5)).
SYSTEMD_EXEC_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin")
UNITS = (
    "bitbuilder-hostshim.service",
    "bitbuilder-hostshim.socket",
    "setup-tenant@.service",
    "bitbuilder-host-layers.service",
)


def shipped_unit(name: str) -> str:
    return resources.files("bitbuilder.hostshim").joinpath("units", name).read_text()


def generator_script(state_dir: Path) -> str:
    # systemd does not keep a generator's stderr: a failed import (the package removed, the
    # interpreter upgraded) goes to the kernel log too, where the boot's journal shows it.
    return (
        f"#!{sys.executable} -I\n"
        "import sys\n"
        "from pathlib import Path\n"
        "try:\n"
        "    from bitbuilder.hostshim.systemd.generator import main\n"
        "except Exception as exc:\n"
        f"    why = f'{GENERATOR_NAME}: cannot import bitbuilder with {{sys.executable}} "
        "({exc!r}): no tenant is restored at this boot; reinstall the package and run "
        "bitbuilder-hostshim-install'\n"
        "    print(why, file=sys.stderr)\n"
        "    try:\n"
        "        with open('/dev/kmsg', 'w') as kmsg:\n"
        "            kmsg.write(f'<3>{why}\\n')\n"
        "    except OSError:\n"
        "        pass\n"
        "    raise SystemExit(1)\n"
        f"raise SystemExit(main(state_dir=Path({str(state_dir)!r})))\n"
    )


def _write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.replace(path)


def link_entry_points(bin_dir: Path) -> list[Path]:
    """Make the units' commands findable by systemd; returns the symlinks made."""
    links = []
    for command in ENTRY_POINTS:
        link = bin_dir / command
        found = shutil.which(command, path=":".join(SYSTEMD_EXEC_PATH))
        if found is not None and Path(found) != link:
            continue
        target = Path(sys.prefix) / "bin" / command
        if not target.is_file():
            raise SystemExit(f"{target} not found: install the package first")
        bin_dir.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(target)
        links.append(link)
    return links


def install(
    unit_dir: Path,
    generator_dir: Path,
    bin_dir: Path,
    network_dir: Path,
    state_dir: Path = DEFAULT_STATE_DIR,
) -> list[Path]:
    """Write everything; returns the paths written. The units, like the shim, use the default
    state dir; `state_dir` is where the generator looks (a test points it elsewhere)."""
    written = [networkd.install(network_dir)]
    for unit in UNITS:
        _write(unit_dir / unit, shipped_unit(unit), 0o644)
        written.append(unit_dir / unit)
    _write(generator_dir / GENERATOR_NAME, generator_script(state_dir), 0o755)
    written.append(generator_dir / GENERATOR_NAME)
    return written + link_entry_points(bin_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bitbuilder-hostshim-install", description=__doc__)
    parser.add_argument("--unit-dir", type=Path, default=Path("/etc/systemd/system"))
    parser.add_argument(
        "--generator-dir", type=Path, default=Path("/usr/lib/systemd/system-generators")
    )
    parser.add_argument("--bin-dir", type=Path, default=Path("/usr/local/bin"))
    parser.add_argument("--network-dir", type=Path, default=networkd.NETWORK_DIR)
    parser.add_argument("--no-reload", action="store_true", help="skip systemctl daemon-reload")
    parser.add_argument("--enable", action="store_true", help="enable and start the shim")
    args = parser.parse_args(argv)
    for path in install(args.unit_dir, args.generator_dir, args.bin_dir, args.network_dir):
        print(f"installed {path}")
    if not args.no_reload:
        systemctl.daemon_reload()
        networkd.reload()
    if args.enable:
        systemctl.enable_now(
            "bitbuilder-hostshim.socket",
            "bitbuilder-hostshim.service",
            "bitbuilder-host-layers.service",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
