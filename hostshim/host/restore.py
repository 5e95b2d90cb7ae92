"""`bitbuilder-hostshim-host-restore`: merge every host profile's last applied revision.

What `bitbuilder-host-layers.service` runs at boot, before any tenant is restored
(setup-tenant@ is ordered after it) and before the shim: the links in /run are gone after a
reboot, the persisted state and the revision trees are on local disk. No control plane, no
network, no shim.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from bitbuilder.hostshim.config import DEFAULT_STATE_DIR, ShimConfig
from bitbuilder.hostshim.errors import ShimError
from bitbuilder.hostshim.host.layers import HostLayers

log = logging.getLogger("bitbuilder.hostshim.host")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bitbuilder-hostshim-host-restore", description=__doc__)
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    try:
        names = HostLayers(ShimConfig(state_dir=args.state_dir)).restore()
    except ShimError as exc:
        log.error("host layers: %s (%s)", exc.message, exc.reason)
        return 1
    log.info("host layers merged: %s", ", ".join(names) or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
