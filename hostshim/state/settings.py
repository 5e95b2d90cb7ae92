"""The shim's machine settings, persisted for `bitbuilder-hostshim-restore`.

setup-tenant@ runs restore at boot without the shim's command line, so a tenant restored there
got the built-in defaults (1Gi memory, an 8Gi disk) whatever the shim was started with. The shim saves the settings that shape a machine in its state dir each
time it starts; restore reads them back. Versioned like the tenant state; an unreadable file
is reported and the defaults used (a tenant still comes back at boot).
"""

from __future__ import annotations

import dataclasses
import json
import logging

from bitbuilder.hostshim.config import ShimConfig
from bitbuilder.hostshim.state.store import write_atomic

VERSION = 1
FILE = "shim-settings.json"
# What a machine is started with (runner, executor); nothing about the API or its callers.
MACHINE_SETTINGS = ("default_memory_bytes", "tenant_disk_bytes")

log = logging.getLogger(__name__)


def save_settings(config: ShimConfig) -> None:
    values = {key: getattr(config, key) for key in MACHINE_SETTINGS}
    body = json.dumps({"version": VERSION, **values}, indent=1).encode()
    try:
        write_atomic(config.state_dir / FILE, body, mode=0o600)
    except OSError as exc:  # a full disk must not keep the shim from serving
        log.warning("cannot save %s (%s): a boot restore uses the built-in settings", FILE, exc)


def with_saved_settings(config: ShimConfig) -> ShimConfig:
    """`config` with the machine settings the shim last saved (as they are when none were)."""
    path = config.state_dir / FILE
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        return config
    except (OSError, ValueError) as exc:
        log.warning("%s unreadable (%s): built-in machine settings used", path, exc)
        return config
    if not isinstance(saved, dict) or saved.get("version") != VERSION:
        log.warning("%s has an unknown version: built-in machine settings used", path)
        return config
    return dataclasses.replace(config, **{k: saved[k] for k in MACHINE_SETTINGS if k in saved})
