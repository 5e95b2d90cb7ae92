"""The fleet repository in standalone mode: Tenant (and HostProfile) manifests from a folder or
a git repo.

A fleet is plain YAML files (multi-document) or a kustomization.yaml whose `resources` list
names files and folders. Every Tenant is validated with the same models as in a cluster; a bad
manifest becomes a `ManifestProblem` and the rest of the fleet is unaffected. Documents of
other kinds (a Namespace, a Secret) are ignored: a fleet repo is often shared with a cluster.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pygit2
import yaml
from pydantic import ValidationError

from bitbuilder.hostshim.api import GitCredentials, VerifySpec
from bitbuilder.operator.api import (
    GROUP,
    HOST_PROFILE_KIND,
    HostProfile,
    Tenant,
    validation_message,
)
from bitbuilder.operator.fleetverify import Unverified, verify_commit

KUSTOMIZATIONS = ("kustomization.yaml", "kustomization.yml", "Kustomization")
YAML_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class ManifestProblem:
    """A manifest that could not be used: where it is, which tenant (if known), why."""

    file: str
    message: str
    name: str | None = None
    kind: str = "Tenant"

    def __str__(self) -> str:
        who = f" ({self.kind.lower()} {self.name!r})" if self.name else ""
        return f"{self.file}{who}: {self.message}"


@dataclass(frozen=True)
class FleetSnapshot:
    revision: str
    tenants: dict[str, Tenant] = field(default_factory=dict)
    problems: list[ManifestProblem] = field(default_factory=list)
    host_profiles: dict[str, HostProfile] = field(default_factory=dict)

    @property
    def broken_names(self) -> set[str]:
        """Tenants whose manifest is broken: still in the fleet, not to be removed."""
        return {p.name for p in self.problems if p.name and p.kind == "Tenant"}

    @property
    def broken_profiles(self) -> set[str]:
        """HostProfiles whose manifest is broken: their layers stay merged as they are."""
        return {p.name for p in self.problems if p.name and p.kind == HOST_PROFILE_KIND}

    @property
    def complete(self) -> bool:
        """Every problem names its tenant. Otherwise a file could not be read (a YAML syntax
        error, a missing kustomization resource): it may hold any tenant, so none has left."""
        return all(p.name for p in self.problems)


class FleetError(Exception):
    """The fleet itself cannot be read (unreachable repo, missing folder)."""


# --- reading manifests ------------------------------------------------------------------------


def manifest_files(root: Path, folder: Path, problems: list[ManifestProblem]) -> Iterator[Path]:
    """The YAML files of a folder: its kustomization's resources, or every YAML file below it."""
    kustomization = next((folder / k for k in KUSTOMIZATIONS if (folder / k).is_file()), None)
    if kustomization is None:
        for path in sorted(folder.rglob("*")):
            hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
            if path.is_file() and path.suffix in YAML_SUFFIXES and not hidden:
                yield path
        return
    rel = str(kustomization.relative_to(root))
    try:
        doc = yaml.safe_load(kustomization.read_text()) or {}
    except yaml.YAMLError as exc:
        problems.append(ManifestProblem(rel, f"not valid YAML: {exc}"))
        return
    resources = doc.get("resources", []) if isinstance(doc, dict) else None
    if not isinstance(resources, list):
        problems.append(ManifestProblem(rel, "'resources' must be a list"))
        return
    for entry in resources:
        target = (folder / str(entry)).resolve()
        if "://" in str(entry) or not target.is_relative_to(root.resolve()):
            problems.append(ManifestProblem(rel, f"resource {entry!r} is outside the fleet"))
        elif target.is_dir():
            yield from manifest_files(root, target, problems)
        elif target.is_file():
            yield target
        else:
            problems.append(ManifestProblem(rel, f"resource {entry!r} does not exist"))


def _documents(path: Path, rel: str, problems: list[ManifestProblem]) -> list[Any]:
    try:
        return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        problems.append(ManifestProblem(rel, f"not valid YAML: {exc}"))
        return []


def _is_tenant(doc: Any) -> bool:
    """Anything of our API group: a typo in kind or version is a problem to report, since
    ignoring the document would remove its tenant (and its data)."""
    if not isinstance(doc, dict):
        return False
    api_version = doc.get("apiVersion")
    return isinstance(api_version, str) and api_version.split("/")[0] == GROUP


def _name_of(doc: dict[str, Any]) -> str | None:
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) else None


def read_fleet(root: Path, revision: str, path: str = "") -> FleetSnapshot:
    """All Tenants under `root/path`; problems for each manifest that is not usable."""
    folder = root / path if path else root
    if not folder.is_dir():
        raise FleetError(f"fleet folder {folder} does not exist")
    problems: list[ManifestProblem] = []
    tenants: dict[str, Tenant] = {}
    profiles: dict[str, HostProfile] = {}
    first_at: dict[str, str] = {}  # tenant name -> where its first manifest is
    seen: set[Path] = set()
    for file in manifest_files(root, folder, problems):
        if file in seen:
            continue
        seen.add(file)
        rel = str(file.relative_to(root))
        for index, doc in enumerate(_documents(file, rel, problems), start=1):
            if not _is_tenant(doc):
                continue
            where = f"{rel} (document {index})"
            name = _name_of(doc)
            manifest = {k: v for k, v in doc.items() if k != "status"}
            if doc.get("kind") == HOST_PROFILE_KIND:
                _read_profile(manifest, where, name, profiles, problems)
                continue
            try:
                tenant = Tenant.from_object(manifest)
            except ValidationError as exc:
                problems.append(ManifestProblem(where, validation_message(exc), name))
                continue
            key = tenant.metadata.name
            if key in first_at:
                # Which one is meant is unknown: apply neither (the machine keeps running as it
                # is), rather than let a new file take over a tenant by sorting first.
                for here, there in ((where, first_at[key]), (first_at[key], where)):
                    message = f"duplicate tenant name (also in {there}): neither is applied"
                    problems.append(ManifestProblem(here, message, key))
                tenants.pop(key, None)
                continue
            first_at[key] = where
            tenants[key] = tenant
    return FleetSnapshot(
        revision=revision, tenants=tenants, problems=problems, host_profiles=profiles
    )


def _read_profile(
    manifest: dict[str, Any],
    where: str,
    name: str | None,
    profiles: dict[str, HostProfile],
    problems: list[ManifestProblem],
) -> None:
    """One HostProfile document; a broken or duplicated one is a problem naming it."""
    try:
        profile = HostProfile.from_object(manifest)
    except ValidationError as exc:
        problems.append(ManifestProblem(where, validation_message(exc), name, HOST_PROFILE_KIND))
        return
    key = profile.metadata.name
    duplicated = any(p.name == key and p.kind == HOST_PROFILE_KIND for p in problems)
    if key in profiles or duplicated:
        message = "duplicate host profile name: neither is applied"
        problems.append(ManifestProblem(where, message, key, HOST_PROFILE_KIND))
        profiles.pop(key, None)
        return
    profiles[key] = profile


def folder_revision(folder: Path) -> str:
    """A content hash of a plain folder's YAML files: it changes when a manifest does."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and (path.suffix in YAML_SUFFIXES or path.name in KUSTOMIZATIONS):
            digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return f"sha256:{digest.hexdigest()[:16]}"


# --- fleet sources ----------------------------------------------------------------------------


class FolderFleet:
    """A plain folder, re-read on every poll."""

    def __init__(self, folder: Path, path: str = "") -> None:
        self.folder = folder
        self.path = path
        self.url = str(folder)

    def head(self) -> str:
        if not self.folder.is_dir():
            raise FleetError(f"fleet folder {self.folder} does not exist")
        return folder_revision(self.folder)

    def snapshot(self, revision: str | None = None) -> FleetSnapshot:
        """The fleet as it is (labelled `revision` when the caller just asked head())."""
        return read_fleet(self.folder, revision or self.head(), self.path)


class GitFleet:
    """A git repository: a bare mirror under the state dir; the remote head is asked before any
    fetch, and each commit's tree is materialised once into a folder to read."""

    def __init__(
        self,
        url: str,
        branch: str,
        workdir: Path,
        path: str = "",
        credentials: GitCredentials | None = None,
        verify: VerifySpec | None = None,
    ) -> None:
        if credentials is not None and credentials.password is None:
            # pygit2 cannot check an ssh host key against known_hosts: refuse rather than trust
            raise FleetError("fleet credentials: only username+password (https) are supported")
        self.url = url
        self.branch = branch
        self.path = path
        self.workdir = workdir
        self.credentials = credentials
        self.verify = verify
        self._repo: pygit2.Repository | None = None

    def _repository(self) -> pygit2.Repository:
        if self._repo is None:
            mirror = self.workdir / "mirror.git"
            if (mirror / "HEAD").exists():
                self._repo = pygit2.Repository(str(mirror))
                self._repo.remotes.set_url("origin", self.url)  # --fleet may have changed
            else:
                mirror.parent.mkdir(parents=True, exist_ok=True)
                self._repo = pygit2.init_repository(str(mirror), bare=True)
                self._repo.remotes.create("origin", self.url)
        return self._repo

    def _callbacks(self) -> pygit2.RemoteCallbacks | None:
        creds = self.credentials
        if creds is None or creds.password is None:
            return None
        user_pass = pygit2.UserPass(creds.username or "git", creds.password.get_secret_value())
        return pygit2.RemoteCallbacks(credentials=user_pass)

    def head(self) -> str:
        """The commit the remote's branch points at (ls-remote: no objects fetched)."""
        remote = self._repository().remotes["origin"]
        try:
            heads = remote.list_heads(callbacks=self._callbacks())
        except pygit2.GitError as exc:
            raise FleetError(f"fleet repo {self.url}: {exc}") from exc
        wanted = f"refs/heads/{self.branch}"
        for head in heads:
            if head.name == wanted:
                return str(head.oid)
        raise FleetError(f"fleet repo {self.url} has no branch {self.branch!r}")

    def snapshot(self, revision: str | None = None) -> FleetSnapshot:
        """The fleet at `revision` (a commit the caller got from head()) or at the head."""
        commit = revision or self.head()
        tree_dir = self.workdir / "trees" / commit
        self._fetch(commit)
        if self.verify is not None:  # every time: the trusted keys may have changed
            try:
                verify_commit(Path(self._repository().path), commit, self.verify)
            except Unverified as exc:
                raise FleetError(f"fleet repo {self.url}: {exc}") from exc
        if not tree_dir.is_dir():
            self._materialise(commit, tree_dir)
        return read_fleet(tree_dir, commit, self.path)

    def _fetch(self, commit: str) -> None:
        repo = self._repository()
        if commit in repo:
            return
        refspec = f"+refs/heads/{self.branch}:refs/remotes/origin/{self.branch}"
        try:
            repo.remotes["origin"].fetch([refspec], callbacks=self._callbacks())
        except pygit2.GitError as exc:
            raise FleetError(f"fleet repo {self.url}: fetch failed: {exc}") from exc
        if commit not in repo:
            raise FleetError(f"fleet repo {self.url}: commit {commit} missing after fetch")

    def _materialise(self, commit: str, target: Path) -> None:
        repo = self._repository()
        tmp = target.with_name(f".{commit}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _write_tree(repo, repo[commit].peel(pygit2.Tree), tmp)
        tmp.rename(target)
        for old in target.parent.iterdir():  # keep only the newest tree
            if old != target:
                shutil.rmtree(old, ignore_errors=True)


def _write_tree(repo: pygit2.Repository, tree: pygit2.Tree, into: Path) -> None:
    """Regular files and folders only: a fleet's YAML needs nothing else, and symlinks could
    point out of the tree."""
    for entry in tree:
        target = into / str(entry.name)
        if entry.type_str == "tree":
            target.mkdir()
            _write_tree(repo, repo[entry.id].peel(pygit2.Tree), target)
        elif entry.type_str == "blob" and entry.filemode in (
            pygit2.enums.FileMode.BLOB,
            pygit2.enums.FileMode.BLOB_EXECUTABLE,
        ):
            target.write_bytes(repo[entry.id].peel(pygit2.Blob).data)


Fleet = FolderFleet | GitFleet


def open_fleet(
    location: str,
    workdir: Path,
    branch: str = "main",
    path: str = "",
    credentials: GitCredentials | None = None,
    verify: VerifySpec | None = None,
) -> Fleet:
    """A folder path (absolute or relative) or a git URL. Signatures need a git URL."""
    if "://" in location or location.endswith(".git") or "@" in location.split("/")[0]:
        return GitFleet(location, branch, workdir, path, credentials, verify)
    if verify is not None:
        raise FleetError("a plain folder has no signatures to verify: use a git URL")
    return FolderFleet(Path(location).resolve(), path)
