"""The tenant repository's layout: what a revision's tree may hold, validated before use.

```
machine.yaml            optional; keys limited to MachineSpec.repo_settings
confext/<name>/etc/...  confext trees (only etc/ at their top)
sysext/<name>/usr/...   sysext trees (only usr/ and opt/ at their top)
units/<unit>.<suffix>   unit files provisioned inside the machine
```

The tree is hostile input: it is read only through safepath (no symlink is ever followed on
the host; symlinks inside extension trees are fine, they are resolved inside the machine).
Every error names the offending path relative to the repository root.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

from bitbuilder.hostshim import safepath
from bitbuilder.hostshim.api import DNS1123_LABEL_PATTERN, ExtensionType, MachineSpec
from bitbuilder.hostshim.errors import LayoutError
from bitbuilder.hostshim.source import extrelease

MAX_TREE_BYTES = 256 * 2**20
MAX_ENTRIES = 20_000
MAX_MANIFEST_BYTES = 64 * 2**10
MAX_UNIT_BYTES = 2**20
MAX_ENV_VARS = 128
MAX_ENV_VALUE = 4096

MANIFEST = "machine.yaml"
UNITS_DIR = "units"
UNIT_SUFFIXES = (".service", ".timer", ".socket", ".path", ".target")
# What may sit at the top of each kind of extension tree, and where its release file lives.
EXTENSION_TOP = {"confext": frozenset({"etc"}), "sysext": frozenset({"usr", "opt"})}
RELEASE_DIR = {"confext": "etc/extension-release.d", "sysext": "usr/lib/extension-release.d"}

_EXTENSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_UNIT_NAME = re.compile(r"^[A-Za-z0-9_:.\\@-]{1,250}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HOSTNAME = re.compile(DNS1123_LABEL_PATTERN)


@dataclass(frozen=True)
class RepoSettings:
    """Settings from the repo's machine.yaml, already limited to what the spec allows."""

    hostname: str | None = None
    environment: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Layout:
    root: Path  # the revision tree joined with spec.source.path
    sysext: dict[str, Path]  # name -> tree dir (contains usr/)
    confext: dict[str, Path]  # name -> tree dir (contains etc/)
    units: dict[str, Path]  # unit file name -> file
    settings: RepoSettings


def load_layout(
    tree: Path, spec: MachineSpec, *, os_release: extrelease.OsRelease | None = None
) -> Layout:
    """Validate the tenant tree at `tree` (the whole revision) for `spec`.

    `os_release` is the image's parsed os-release; when given, an extension carrying a release
    file must be one systemd would merge into that OS (extrelease.incompatibility); without
    it only the OS-independent rules apply. Raises LayoutError naming the offending path.
    """
    prefix = PurePosixPath(spec.source.path if spec.source else "")
    with safepath.fd_closing(_open_root(tree, prefix)) as root_fd:
        entries = _scan(root_fd, prefix)
        root = Path(tree, prefix)
        check = _Checker(root_fd, prefix, entries, os_release)
        trees = {kind: check.extensions(kind) for kind in EXTENSION_TOP}
        if spec.extensions is not None:
            trees = _select(trees, spec, prefix)
        units = check.units()
        settings = check.settings(spec)
    return Layout(
        root=root,
        sysext={name: root / "sysext" / name for name in sorted(trees["sysext"])},
        confext={name: root / "confext" / name for name in sorted(trees["confext"])},
        units={name: root / UNITS_DIR / name for name in sorted(units)},
        settings=settings,
    )


def _open_root(tree: Path, prefix: PurePosixPath) -> int:
    where = str(prefix) if str(prefix) != "." else "the repository root"
    try:
        return safepath.open_dir(tree, prefix)
    except FileNotFoundError as exc:
        raise LayoutError(f"{where}: no such directory in this revision") from exc
    except OSError as exc:
        raise LayoutError(f"{where}: {_why(exc)}") from exc


def _why(exc: OSError) -> str:
    return str(exc) if isinstance(exc, safepath.UnsafePath) else exc.strerror or str(exc)


def _scan(root_fd: int, prefix: PurePosixPath) -> dict[PurePosixPath, os.stat_result]:
    """Every entry with its lstat; limits, file types and names checked on the way."""
    entries: dict[PurePosixPath, os.stat_result] = {}
    total = 0
    for entry in safepath.walk(root_fd):
        shown = prefix / entry.rel
        if _CONTROL.search(entry.rel.name):
            raise LayoutError(f"{shown!s:.200}: file name contains control characters")
        mode = entry.st.st_mode
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            raise LayoutError(f"{shown}: a {safepath.kind(mode)} is not allowed in a tenant repo")
        if stat.S_ISREG(mode):
            total += entry.st.st_size
        entries[entry.rel] = entry.st
        if len(entries) > MAX_ENTRIES:
            raise LayoutError(f"{prefix}: more than {MAX_ENTRIES} files and directories")
        if total > MAX_TREE_BYTES:
            raise LayoutError(f"{shown}: the tree exceeds {MAX_TREE_BYTES >> 20} MiB")
    return entries


def _select(
    trees: dict[str, set[str]], spec: MachineSpec, prefix: PurePosixPath
) -> dict[str, set[str]]:
    selected: dict[str, set[str]] = {kind: set() for kind in trees}
    for ext in spec.extensions or []:
        if ext.name not in trees[ext.type.value]:
            raise LayoutError(
                f"{prefix / ext.type.value / ext.name}: extension not in this revision"
            )
        selected[ext.type.value].add(ext.name)
    return selected


@dataclass
class _Checker:
    root_fd: int
    prefix: PurePosixPath
    entries: dict[PurePosixPath, os.stat_result]
    os_release: extrelease.OsRelease | None

    def _children(self, rel: PurePosixPath) -> list[PurePosixPath]:
        return [p for p in self.entries if p.parent == rel and p != rel]

    def _is_dir(self, rel: PurePosixPath, what: str, required: bool = False) -> bool:
        st = self.entries.get(rel)
        if st is None:
            if required:
                raise LayoutError(f"{self.prefix / rel}: missing {what}")
            return False
        if not stat.S_ISDIR(st.st_mode):
            kind = safepath.kind(st.st_mode)
            raise LayoutError(f"{self.prefix / rel}: {what} must be a directory, not a {kind}")
        return True

    def extensions(self, kind: str) -> set[str]:
        base = PurePosixPath(kind)
        if not self._is_dir(base, f"the {kind} folder"):
            return set()
        names = set()
        for tree in self._children(base):
            if not _EXTENSION_NAME.fullmatch(tree.name):
                raise LayoutError(f"{self.prefix / tree}: invalid {kind} name")
            self._is_dir(tree, f"a {kind} tree")
            self._extension_top(kind, tree)
            self._release(kind, tree)
            names.add(tree.name)
        return names

    def _extension_top(self, kind: str, tree: PurePosixPath) -> None:
        allowed = EXTENSION_TOP[kind]
        tops = self._children(tree)
        if not tops:
            raise LayoutError(f"{self.prefix / tree}: empty {kind} tree (needs {_list(allowed)})")
        for top in tops:
            if top.name not in allowed:
                raise LayoutError(
                    f"{self.prefix / top}: a {kind} tree may hold only {_list(allowed)}"
                )
            self._is_dir(top, f"{top.name}/ of a {kind} tree")

    def _release(self, kind: str, tree: PurePosixPath) -> None:
        rel = tree / RELEASE_DIR[kind] / f"extension-release.{tree.name}"
        if rel not in self.entries:
            return
        text = self._read(rel, MAX_MANIFEST_BYTES).decode("utf-8", "replace")
        release = extrelease.parse_os_release(text)
        ext = ExtensionType(kind)
        if self.os_release is None:
            problem = extrelease.release_problem(ext, release)
        else:
            problem = extrelease.incompatibility(ext, release, self.os_release)
        if problem:
            raise LayoutError(f"{self.prefix / rel}: refused as systemd-{kind} would: {problem}")

    def _read(self, rel: PurePosixPath, limit: int) -> bytes:
        try:
            return safepath.read_bytes(self.root_fd, rel, limit)
        except OSError as exc:
            raise LayoutError(f"{self.prefix / rel}: {_why(exc)}") from exc

    def units(self) -> set[str]:
        base = PurePosixPath(UNITS_DIR)
        if not self._is_dir(base, "the units folder"):
            return set()
        names = set()
        for unit in self._children(base):
            shown = self.prefix / unit
            if not (_UNIT_NAME.fullmatch(unit.name) and unit.name.endswith(UNIT_SUFFIXES)):
                raise LayoutError(f"{shown}: not a unit file name (*{', *'.join(UNIT_SUFFIXES)})")
            st = self.entries[unit]
            if not stat.S_ISREG(st.st_mode):
                raise LayoutError(
                    f"{shown}: unit files must be regular files, not a {safepath.kind(st.st_mode)}"
                )
            if st.st_size > MAX_UNIT_BYTES:
                raise LayoutError(f"{shown}: larger than {MAX_UNIT_BYTES >> 10} KiB")
            names.add(unit.name)
        return names

    def settings(self, spec: MachineSpec) -> RepoSettings:
        rel = PurePosixPath(MANIFEST)
        if rel not in self.entries:
            return RepoSettings()
        shown = self.prefix / rel
        try:
            data = yaml.safe_load(self._read(rel, MAX_MANIFEST_BYTES))
        except yaml.YAMLError as exc:
            raise LayoutError(f"{shown}: not valid YAML ({exc})") from exc
        except RecursionError:  # PyYAML builds nested collections recursively
            raise LayoutError(f"{shown}: nested too deeply") from None
        if data is None:
            return RepoSettings()
        if not isinstance(data, dict):
            raise LayoutError(f"{shown}: must be a mapping of settings")
        for key in data:
            if key not in spec.repo_settings:
                allowed = ", ".join(spec.repo_settings) or "none"
                raise LayoutError(
                    f"{shown}: key {str(key)!r:.80} is not allowed for this machine "
                    f"(allowed: {allowed})"
                )
        return RepoSettings(
            hostname=_hostname(data.get("hostname"), shown),
            environment=_environment(data.get("environment"), shown),
        )


def _list(names: frozenset[str]) -> str:
    return " and ".join(f"{n}/" for n in sorted(names, reverse=True))


def _hostname(value: object, shown: PurePosixPath) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _HOSTNAME.fullmatch(value) or len(value) > 63:
        raise LayoutError(f"{shown}: hostname must be a DNS label (got {str(value)!r:.80})")
    return value


def _environment(value: object, shown: PurePosixPath) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_ENV_VARS:
        raise LayoutError(f"{shown}: environment must be a mapping of at most {MAX_ENV_VARS}")
    env = {}
    for name, raw in value.items():
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise LayoutError(f"{shown}: environment name {str(name)!r:.80} is not valid")
        if isinstance(raw, bool) or not isinstance(raw, str | int):
            raise LayoutError(f"{shown}: environment {name} must be a string")
        text = str(raw)
        if len(text) > MAX_ENV_VALUE or "\x00" in text or "\n" in text:
            raise LayoutError(f"{shown}: environment {name} is too long or has NUL/newline")
        env[name] = text
    return env
