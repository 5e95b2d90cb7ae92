"""Whether a sysext/confext tree may be layered into a machine, by systemd's rules.

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

Pure functions over parsed os-release files: the layout check (source/layout.py) and the systemd
host share them.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping

from bitbuilder.hostshim.api import ExtensionType

# An os-release or extension-release file as KEY -> value.
OsRelease = Mapping[str, str]

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


def parse_os_release(text: str) -> dict[str, str]:
    """KEY=value lines (quotes around the value dropped; a later assignment wins)."""
    values = {}
    for line in text.splitlines():
        name, sep, value = line.strip().partition("=")
        if sep:
            values[name] = value.strip().strip("\"'")
    return values


def native_architecture() -> str:
    machine = platform.machine()
    return _ARCHITECTURES.get(machine, machine)


def _prefix(kind: ExtensionType) -> str:
    return "SYSEXT" if kind is ExtensionType.sysext else "CONFEXT"


def release_problem(
    kind: ExtensionType, release: OsRelease, architecture: str | None = None
) -> str | None:
    """What is wrong with an extension-release whatever the OS (architecture, scope, ID=)."""
    arch = release.get("ARCHITECTURE")
    native = architecture or native_architecture()
    if arch and arch != "_any" and arch != native:
        return f"ARCHITECTURE={arch} is not this machine's ({native})"
    scope = release.get(f"{_prefix(kind)}_SCOPE")
    if scope is not None and "system" not in scope.split():
        return f"{_prefix(kind)}_SCOPE={scope} does not include 'system'"
    if not release.get("ID"):
        return "its extension-release has no ID="
    return None


def incompatibility(
    kind: ExtensionType,
    release: OsRelease | None,
    os_release: OsRelease,
    architecture: str | None = None,
) -> str | None:
    """Why systemd would refuse this extension for this OS; None when it would merge it.

    `release` is the parsed extension-release file (None: the tree has none)."""
    if release is None:
        return "it carries no extension-release file"
    problem = release_problem(kind, release, architecture)
    ext_id = release.get("ID")
    if problem or ext_id == "_any":
        return problem
    os_id = os_release.get("ID", "")
    if ext_id != os_id and ext_id not in os_release.get("ID_LIKE", "").split():
        return f"ID={ext_id} does not match the OS (ID={os_id})"
    level_key = f"{_prefix(kind)}_LEVEL"
    os_level = os_release.get(level_key)
    os_version = os_release.get("VERSION_ID")
    ext_level = release.get(level_key)
    if os_level and ext_level:
        if os_level != ext_level:
            return f"{level_key}={ext_level} does not match the OS ({os_level})"
    elif os_version and release.get("VERSION_ID") != os_version:
        return f"VERSION_ID={release.get('VERSION_ID')} does not match the OS ({os_version})"
    return None
