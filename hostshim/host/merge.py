"""Merge trees over the host's /usr and /etc with systemd-sysext and systemd-confext.

The shim never mounts anything itself here: each wanted tree gets a symlink in the runtime
search dir of its tool (/run/extensions, /run/confexts; the link's name is the extension's,
which its extension-release file must match), then `systemd-sysext refresh` /
`systemd-confext refresh` re-merge everything found there and in the host's own dirs. Links
the shim owns are those pointing below its host state folder; any other extension on the host
is left alone, and a name the host already uses elsewhere is refused. /run empties at boot:
the boot-time merge (host/restore.py) puts the links back from the persisted state.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

from bitbuilder.hostshim.api import ExtensionType
from bitbuilder.hostshim.errors import ShimError

LINK_DIRS = {
    ExtensionType.sysext: Path("/run/extensions"),
    ExtensionType.confext: Path("/run/confexts"),
}
TOOLS = {ExtensionType.sysext: "systemd-sysext", ExtensionType.confext: "systemd-confext"}
HIERARCHIES = {ExtensionType.sysext: "/usr", ExtensionType.confext: "/etc"}
TOOL_TIMEOUT = 120.0

Trees = Mapping[ExtensionType, Mapping[str, Path]]
Run = Callable[[list[str]], subprocess.CompletedProcess[str]]


class MergeError(ShimError):
    """systemd-sysext/confext refused or did not merge a tree; the previous merge is restored."""

    status = 422
    reason = "MergeFailed"


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT, stdin=subprocess.DEVNULL
        )
    except FileNotFoundError:
        raise MergeError(
            f"{argv[0]} is not installed on this host", reason="MergeUnsupported"
        ) from None
    except subprocess.TimeoutExpired:
        raise MergeError(f"{' '.join(argv)} did not finish in {TOOL_TIMEOUT:g} s") from None


class Merger:
    def __init__(
        self, owned_root: Path, link_dirs: Mapping[ExtensionType, Path] = LINK_DIRS, run: Run = _run
    ) -> None:
        self.owned_root = owned_root
        self.link_dirs = link_dirs
        self.run = run

    def owned(self) -> dict[ExtensionType, dict[str, Path]]:
        """The links the shim made, by kind: name -> the tree they point at."""
        found: dict[ExtensionType, dict[str, Path]] = {}
        for kind, folder in self.link_dirs.items():
            found[kind] = {}
            if not folder.is_dir():
                continue
            for link in folder.iterdir():
                if link.is_symlink():
                    target = Path(os.readlink(link))
                    if self.owned_root in target.parents:
                        found[kind][link.name] = target
        return found

    def merge(self, wanted: Trees, *, refresh: bool = False) -> None:
        """Make the links exactly `wanted` and re-merge each kind whose links changed (every
        kind with `refresh`); then check that systemd merged every wanted tree."""
        owned = self.owned()
        for kind, folder in self.link_dirs.items():
            want = dict(wanted.get(kind, {}))
            for name in want:
                link = folder / name
                if name not in owned[kind] and (link.exists() or link.is_symlink()):
                    raise MergeError(
                        f"{kind.value} {name!r}: {link} is already on this host and not a "
                        "BitBuilder layer; rename the tree in the repository"
                    )
            if want == owned[kind] and not refresh:
                continue
            folder.mkdir(mode=0o755, parents=True, exist_ok=True)
            for name in set(owned[kind]) - set(want):
                (folder / name).unlink(missing_ok=True)
            for name, tree in want.items():
                if owned[kind].get(name) != tree:
                    _link(folder / name, tree)
            self._refresh(kind, set(want))

    def _refresh(self, kind: ExtensionType, names: set[str]) -> None:
        tool = TOOLS[kind]
        result = self.run([tool, "refresh"])
        if result.returncode != 0:
            raise MergeError(f"{tool} refresh failed: {_tail(result.stderr or result.stdout)}")
        missing = names - self.merged(kind)
        if missing:
            raise MergeError(
                f"{tool} did not merge {', '.join(sorted(missing))}: "
                f"{_tail(result.stderr or result.stdout)}"
            )

    def merged(self, kind: ExtensionType) -> set[str]:
        """The extensions systemd reports merged over the kind's hierarchy."""
        tool = TOOLS[kind]
        result = self.run([tool, "status", "--json=short"])
        if result.returncode != 0:
            raise MergeError(f"{tool} status failed: {_tail(result.stderr)}")
        for entry in json.loads(result.stdout or "[]"):
            if entry.get("hierarchy") == HIERARCHIES[kind]:
                extensions = entry.get("extensions")
                return set(extensions) if isinstance(extensions, list) else set()
        return set()


def _link(link: Path, target: Path) -> None:
    """Point `link` at `target`, replacing it atomically (a rename over the old link)."""
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def _tail(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " / ".join(lines[-3:])[:500] or "no output"
