"""systemd-sysext / systemd-confext compatibility of an extension with a machine's OS.

A tenant's extension trees are layered into its machine by nspawn (`--overlay-ro=` over /usr
and /etc, runtime/nspawn.py), never merged on the host. Whether a tree may be layered is
decided the way systemd-sysext and systemd-confext decide it (systemd 257,
extension_release_validate()), from the tree's `extension-release.<name>` and the image's
os-release; tests/system checks every rule here against the real tools in the test host:

- ARCHITECTURE=, when set and not `_any`, must be this machine's architecture;
- SYSEXT_SCOPE= / CONFEXT_SCOPE=, when set, must include `system`;
- ID= must be there and be `_any` (nothing more is checked), the OS's ID, or in its ID_LIKE=;
- an OS without VERSION_ID= and without a level takes any version (rolling releases);
- when both declare SYSEXT_LEVEL= (CONFEXT_LEVEL= for confext) the levels must be equal;
  otherwise, if the OS has a VERSION_ID=, the extension's must equal it.
"""

from __future__ import annotations

import platform

from bitbuilder.hostshim.api import ExtensionType
from bitbuilder.hostshim.layout import os_release_value

# uname's machine names as systemd spells architectures (the ones a tenant host may run on).
_ARCHITECTURES = {
    "x86_64": "x86-64",
    "aarch64": "arm64",
    "i686": "x86",
    "i386": "x86",
    "armv7l": "arm",
    "ppc64le": "ppc64-le",
    "riscv64": "riscv64",
    "s390x": "s390x",
}


def native_architecture() -> str:
    machine = platform.machine()
    return _ARCHITECTURES.get(machine, machine)


def _prefix(kind: ExtensionType) -> str:
    return "SYSEXT" if kind is ExtensionType.sysext else "CONFEXT"


def incompatibility(
    kind: ExtensionType,
    release: str | None,
    os_release: str,
    architecture: str | None = None,
) -> str | None:
    """Why systemd would refuse this extension for this OS; None when it would merge it.

    `release` is the extension-release file's text (None: the tree has none)."""
    if release is None:
        return "it carries no extension-release file"
    arch = os_release_value(release, "ARCHITECTURE")
    native = architecture or native_architecture()
    if arch and arch != "_any" and arch != native:
        return f"ARCHITECTURE={arch} is not this machine's ({native})"
    scope = os_release_value(release, f"{_prefix(kind)}_SCOPE")
    if scope is not None and "system" not in scope.split():
        return f"{_prefix(kind)}_SCOPE={scope} does not include 'system'"
    ext_id = os_release_value(release, "ID")
    if not ext_id:
        return "its extension-release has no ID="
    if ext_id == "_any":
        return None
    os_id = os_release_value(os_release, "ID") or ""
    like = (os_release_value(os_release, "ID_LIKE") or "").split()
    if ext_id != os_id and ext_id not in like:
        return f"ID={ext_id} does not match the OS (ID={os_id})"
    level_key = f"{_prefix(kind)}_LEVEL"
    os_level = os_release_value(os_release, level_key)
    os_version = os_release_value(os_release, "VERSION_ID")
    if not os_version and not os_level:
        return None
    ext_level = os_release_value(release, level_key)
    if os_level and ext_level:
        if os_level != ext_level:
            return f"{level_key}={ext_level} does not match the OS ({os_level})"
        return None
    if os_version:
        ext_version = os_release_value(release, "VERSION_ID")
        if ext_version != os_version:
            return f"VERSION_ID={ext_version} does not match the OS ({os_version})"
    return None
