"""The read-only layers a machine gets from its revision: extension trees and units.

Layer paths go to nspawn, which follows symlinks in them on the host: only real directories of
the revision tree are used. Units are copied (regular files only) into an etc/ tree of the
run dir, with the WantedBy= links `systemctl enable` would make.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from pathlib import Path

from bitbuilder.hostshim.errors import MachineError
from bitbuilder.hostshim.source.layout import Layout

_TARGET = re.compile(r"^[A-Za-z0-9_.@-]{1,240}\.target$")


def _wanted_by(unit: Path) -> list[str]:
    """The targets a unit's [Install] section names in WantedBy= (checked names only)."""
    targets: list[str] = []
    section = ""
    for line in unit.read_text(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Install]" and line.startswith("WantedBy="):
            targets += [t for t in line.split("=", 1)[1].split() if _TARGET.fullmatch(t)]
    return targets


def _real_dir_below(base: Path, path: Path) -> bool:
    """Is `path` a directory below `base` reached without any symlink? nspawn follows
    symlinks in layer paths on the host, so a tenant's symlink must never get there."""
    try:
        parts = path.relative_to(base).parts
    except ValueError:
        return False
    current = base
    for part in parts:
        current = current / part
        try:
            if not stat.S_ISDIR(os.lstat(current).st_mode):
                return False
        except FileNotFoundError:
            return False
    return True


def tree_layers(root: Path, trees: dict[str, Path], top: str) -> list[Path]:
    """Each extension tree's `top` dir (etc/ or usr/), lowest (first by name) first."""
    layers = []
    for name in sorted(trees):
        layer = trees[name] / top
        if not os.path.lexists(layer):
            continue  # e.g. a sysext with only opt/
        if not _real_dir_below(root, layer):
            raise MachineError(f"extension {name!r}: {top}/ is not a real directory of the tree")
        layers.append(layer)
    return layers


def build_units_layer(dest: Path, units: dict[str, Path]) -> Path:
    """An etc/ tree with the repo's units in systemd/system and their WantedBy= links."""
    system = dest / "etc/systemd/system"
    system.mkdir(parents=True)
    for unit_name, source in sorted(units.items()):
        st = os.lstat(source)
        if not stat.S_ISREG(st.st_mode) or "/" in unit_name or unit_name.startswith("."):
            raise MachineError(f"unit {unit_name!r} is not a regular file", reason="InvalidUnit")
        shutil.copyfile(source, system / unit_name, follow_symlinks=False)
        for target in _wanted_by(system / unit_name):
            wants = system / f"{target}.wants"
            wants.mkdir(exist_ok=True)
            (wants / unit_name).symlink_to(f"../{unit_name}")
    return dest / "etc"


def _capped(run_dir: Path, layers: list[Path], top: str) -> tuple[Path, ...]:
    """`layers` under an empty topmost layer of our own: nspawn makes its overlay work dir
    beside the topmost path, which must never be inside the tenant's revision tree."""
    if not layers:
        return ()
    cap = run_dir / "layer-caps" / top
    cap.mkdir(parents=True, exist_ok=True)
    return (*layers, cap)


def machine_layers(
    run_dir: Path, layout: Layout | None, with_units: bool
) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """(layers over /etc, layers over /usr), lowest first; units only `with_units` (systemd)."""
    if layout is None:
        return (), ()
    etc = tree_layers(layout.root, layout.confext, "etc")
    usr = tree_layers(layout.root, layout.sysext, "usr")
    if layout.units and with_units:
        etc.insert(0, build_units_layer(run_dir / "units", layout.units))
    return _capped(run_dir, etc, "etc"), _capped(run_dir, usr, "usr")


# Where the machine sees its revision tree and units layer (idmapped binds, see nspawn.py).
INSIDE = "/.bitbuilder"


def layer_sources(run_dir: Path, layout: Layout | None) -> tuple[tuple[Path, str], ...]:
    """The host dirs the layers come from, each with where the machine sees it: the revision's
    files are host root's, and idmapped they are the machine root's, not nobody's."""
    if layout is None:
        return ()
    sources = [(layout.root, f"{INSIDE}/revision")]
    if (run_dir / "units").is_dir():
        sources.append((run_dir / "units", f"{INSIDE}/units"))
    return tuple(sources)
