"""A systemd generator: at boot, pull in `setup-tenant@<name>.service` for every tenant whose
persisted state says its last applied machine was running.

systemd runs generators very early, before any unit starts, with three output directories as
arguments; this writes `multi-user.target.wants/setup-tenant@<name>.service` symlinks into the
first (normal) one. Each instance runs `bitbuilder-hostshim restore <name>`, which brings that
tenant up from its applied spec and revision tree on local disk: no control plane, no network.

The installed generator is a two-line script (see systemd/install.py) calling main() with the
state dir baked in. A generator must never break the boot: a tenant whose state cannot be read
is reported on stderr (the journal) and skipped.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from bitbuilder.hostshim.config import DEFAULT_STATE_DIR, ShimConfig
from bitbuilder.hostshim.state.store import Intent, StateError, StateStore

TEMPLATE = "setup-tenant@.service"
WANTED_BY = "multi-user.target"
# Where an installed template may live, most specific first (systemd's own search order).
UNIT_DIRS = (
    Path("/etc/systemd/system"),
    Path("/usr/local/lib/systemd/system"),
    Path("/usr/lib/systemd/system"),
)


def tenants_to_restore(state_dir: Path) -> list[str]:
    """Tenants whose last applied machine was running (and that are not being deleted)."""
    store = StateStore(ShimConfig(state_dir=state_dir))
    names = []
    for name in store.names():
        try:
            state = store.load(name)
        except StateError as exc:
            print(f"bitbuilder-generator: skipping {name}: {exc.message}", file=sys.stderr)
            continue
        if state is None or state.applied is None or not state.applied.running:
            continue
        if state.intent is Intent.delete:
            continue
        names.append(name)
    return names


def template_path(unit_dirs: Sequence[Path] = UNIT_DIRS) -> Path:
    for unit_dir in unit_dirs:
        if (unit_dir / TEMPLATE).is_file():
            return unit_dir / TEMPLATE
    # The symlink's name is what pulls the instance in; its target is only informative.
    return unit_dirs[-1] / TEMPLATE


def generate(state_dir: Path, normal_dir: Path, template: Path) -> list[str]:
    """Write the wants symlinks; returns the tenant names pulled in."""
    wants = normal_dir / f"{WANTED_BY}.wants"
    names = tenants_to_restore(state_dir)
    if names:
        wants.mkdir(parents=True, exist_ok=True)
    for name in names:
        link = wants / f"setup-tenant@{name}.service"
        link.unlink(missing_ok=True)
        link.symlink_to(template)
    return names


def main(argv: Sequence[str] | None = None, state_dir: Path = DEFAULT_STATE_DIR) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (1, 3):
        print(
            "usage: bitbuilder-hostshim-generator NORMAL_DIR [EARLY_DIR LATE_DIR]", file=sys.stderr
        )
        return 2
    try:
        generate(state_dir, Path(args[0]), template_path())
    except OSError as exc:
        print(f"bitbuilder-generator: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
