"""`bitbuilder-hostshim-restore NAME`: bring one tenant up at its last applied revision.

What `setup-tenant@NAME.service` runs at boot. It needs neither the control plane nor the
network, nor the shim's API: the persisted applied spec, the revision tree checked out under
the state dir and the image are all on local disk. A tenant already running (or not meant to
run) is left alone; the shim, started after every setup-tenant@ unit, adopts what this started.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from bitbuilder.hostshim.config import DEFAULT_RUNTIME_DIR, DEFAULT_STATE_DIR, ShimConfig
from bitbuilder.hostshim.errors import ShimError
from bitbuilder.hostshim.images.store import ImageStore
from bitbuilder.hostshim.machine.executor import select_executor
from bitbuilder.hostshim.machine.runner import Runner
from bitbuilder.hostshim.paths import TenantPaths, checked_name
from bitbuilder.hostshim.source.git import Checkout
from bitbuilder.hostshim.source.layout import load_layout
from bitbuilder.hostshim.state.settings import with_saved_settings
from bitbuilder.hostshim.state.store import Intent, StateStore

log = logging.getLogger("bitbuilder.hostshim.restore")


def restore(config: ShimConfig, name: str) -> str:
    """Start `name` as last applied; returns what was done (for the journal)."""
    state = StateStore(config).load(name)
    if state is None or state.applied is None:
        return "nothing applied yet: nothing to restore"
    applied = state.applied
    if not applied.running or state.intent is Intent.delete:
        return "not running when last applied: left stopped"
    # A VM is left to boot: the shim, ordered after this unit, must not wait minutes on it.
    runner = Runner(config, ImageStore(config), select_executor(config), await_guests=False)
    if runner.inspect(name) is not None:
        return "already running"
    checkout = None
    if applied.commit is not None:
        tree = TenantPaths(config, name).revision(applied.commit)
        if not tree.is_dir():
            raise ShimError(f"revision tree {tree} is missing: the shim must fetch it again")
        layout = load_layout(tree, applied.spec)
        checkout = Checkout(applied.commit, applied.ref or applied.commit, tree, layout)
    machine = runner.start(applied.spec, checkout)
    return f"started at {applied.revision or 'no revision'} (leader pid {machine.leader_pid})"


def restore_config(state_dir: Path, runtime_dir: Path, executor: str) -> ShimConfig:
    """The shim's dirs as given, its machine settings as the shim last saved them."""
    base = ShimConfig(state_dir=state_dir, runtime_dir=runtime_dir, executor=executor)
    return with_saved_settings(base)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bitbuilder-hostshim-restore", description=__doc__)
    parser.add_argument("name", type=checked_name)
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    parser.add_argument("--runtime-dir", type=Path, default=DEFAULT_RUNTIME_DIR)
    parser.add_argument("--executor", choices=("auto", "direct", "systemd"), default="auto")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    config = restore_config(args.state_dir, args.runtime_dir, args.executor)
    try:
        log.info("tenant %s: %s", args.name, restore(config, args.name))
    except ShimError as exc:
        log.error("tenant %s: %s (%s)", args.name, exc.message, exc.reason)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
