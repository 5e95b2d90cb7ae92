"""The tenant's config repo through pygit2: fetch, verify, check out one tree per commit.

Per tenant: a bare repository (TenantPaths.repo) holding only the refs the spec follows, and
one immutable directory per checked-out commit (TenantPaths.revision). The remote's head is
asked first (ls-remote); objects are fetched only when it differs from the local ref. Git is
the truth: a force-pushed branch is followed, and reported on the Checkout.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Collection
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlsplit

import pygit2

from bitbuilder.hostshim import safepath
from bitbuilder.hostshim.api import GitCredentials, GitRef, MachineSpec, SourceSpec
from bitbuilder.hostshim.config import ShimConfig
from bitbuilder.hostshim.errors import SourceError
from bitbuilder.hostshim.paths import ImagePaths, TenantPaths
from bitbuilder.hostshim.source import addresses, checkout, credentials, extrelease, signing
from bitbuilder.hostshim.source.layout import Layout, load_layout
from bitbuilder.hostshim.timing import phase

log = logging.getLogger(__name__)
T = TypeVar("T")

CONNECT_TIMEOUT_MS = 5_000  # TCP connect; an unreachable host fails in seconds, not minutes
IO_TIMEOUT_MS = 30_000  # a server that stalls mid-conversation
# One fetch may bring at most this much (the checkout itself is limited by the layout), in at
# most this time: a hostile remote must not fill the host's state disk, nor hold one of the
# shim's workers for ever by sending a byte just before each read times out.
MAX_FETCH_BYTES = 1 << 30
MAX_FETCH_SECONDS = 600.0
# The remote's ref list (ls-remote) is read whole by libgit2: past these it is refused, so a
# remote with a million refs costs one refusal, not a status and a state that carry it along.
MAX_REFS = 20_000
MAX_REF_NAME_BYTES = 4 << 20
ORIGIN_BRANCH = "refs/remotes/origin/"
URL_KEY = "bitbuilder.url"  # the remote this repository mirrors
ALL_REFS = ["+refs/heads/*:refs/remotes/origin/*", "+refs/tags/*:refs/tags/*"]
_OS_RELEASE = ("etc/os-release", "usr/lib/os-release")  # systemd's order

# libgit2's messages, by what they mean (matched with the URL cut out: a host or port in it
# must not look like a status code).
_AUTH = re.compile(r"authentication|credentials|callback set|status code: 40[13]\b")
_CORRUPT = re.compile(
    r"corrupt|hash mismatch|inflate|decompress|zlib|object not found|failed to parse"
    r"|packfile|bad object|invalid object|loose object|object header"
)
_CERTIFICATE = re.compile(r"certificate|hostkey|host key")


class RefNotFound(SourceError):
    reason = "RefNotFound"


class CorruptRepository(SourceError):
    reason = "CorruptRepository"


class LocalCorruption(CorruptRepository):
    """The shim's own copy is damaged (disk, crash): recovered by cloning again."""


class SourceNotAllowed(SourceError):
    reason = "SourceNotAllowed"


class SourceTooLarge(SourceError):
    reason = "SourceTooLarge"


class SourceTooSlow(SourceError):
    reason = "SourceTooSlow"


class _Callbacks(credentials.Callbacks):
    """The tenant's credentials; a fetch past MAX_FETCH_BYTES or MAX_FETCH_SECONDS is aborted
    (libgit2 calls these as the server's data and messages arrive)."""

    def __init__(self, creds: GitCredentials | None, user: str) -> None:
        super().__init__(creds, user)
        self._deadline = time.monotonic() + MAX_FETCH_SECONDS

    def _in_time(self) -> None:
        if time.monotonic() > self._deadline:
            raise SourceTooSlow(f"the fetch took longer than {MAX_FETCH_SECONDS:g} s; aborted")

    def sideband_progress(self, string: str) -> None:
        self._in_time()

    def transfer_progress(self, stats: pygit2.remotes.TransferProgress) -> None:
        self._in_time()
        if stats.received_bytes > MAX_FETCH_BYTES:
            raise SourceTooLarge(f"the fetch exceeds {MAX_FETCH_BYTES / 2**20:g} MiB; aborted")


@dataclass(frozen=True)
class Checkout:
    commit: str  # 40 hex
    ref: str  # "main", "v1.0" or the commit itself
    tree: Path  # TenantPaths.revision(commit): complete and immutable once returned
    layout: Layout
    # The local head this sync replaced when the remote branch was force-pushed to a commit
    # that does not descend from it (git is the truth: followed, but worth a status line).
    forced_from: str | None = None

    @property
    def revision(self) -> str:
        return f"{self.ref}@sha1:{self.commit}"


class GitSource:
    def __init__(self, paths: TenantPaths, config: ShimConfig) -> None:
        self.paths = paths
        self.config = config
        pygit2.settings.server_connect_timeout = CONNECT_TIMEOUT_MS
        pygit2.settings.server_timeout = IO_TIMEOUT_MS

    # --- public -------------------------------------------------------------------------------

    def remote_head(self, spec: SourceSpec) -> str:
        """The commit (or tag object, if the server does not peel) the ref names on the remote.

        Only the ref advertisement is read; no object is fetched. A pinned commit is itself.
        """
        self._check_allowed(spec.url)
        if spec.ref.commit:
            return spec.ref.commit
        repo = self._open(spec.url)
        try:
            direct, peeled = self._advertised(repo, spec)
        finally:
            repo.free()
        return peeled or direct

    def sync(
        self, spec: MachineSpec, *, os_release: extrelease.OsRelease | None = None
    ) -> Checkout:
        """Bring the ref's commit into a checked-out, verified, layout-checked revision tree.

        Extension releases are checked against `os_release` when given (the host's own, for
        host layers), else against the spec's image."""
        source = spec.source
        if source is None:
            raise SourceError("the machine has no source", reason="NoSource")
        self._check_allowed(source.url)
        try:
            return self._sync(spec, source, os_release)
        except LocalCorruption as exc:
            # Start from an empty repository, once; a corrupt remote is reported as it is.
            log.warning("%s: %s; re-cloning the repository", self.paths.name, exc.message)
            safepath.remove_tree(self.paths.repo)
            return self._sync(spec, source, os_release)

    def prune(self, keep: Collection[str]) -> None:
        """Drop revision trees (and leftovers of interrupted checkouts) not in `keep`."""
        if not self.paths.revisions.is_dir():
            return
        for child in self.paths.revisions.iterdir():
            if child.name in keep:
                continue
            try:
                safepath.remove_tree(child)
            except OSError as exc:  # e.g. still mounted by a running machine
                log.warning("%s: keeping revision %s: %s", self.paths.name, child.name, exc)

    def remove(self) -> None:
        """Remove the repository, every revision tree and the credentials."""
        for path in (self.paths.repo, self.paths.revisions, self.paths.credentials):
            safepath.remove_tree(path)

    # --- steps --------------------------------------------------------------------------------

    def _sync(
        self, spec: MachineSpec, source: SourceSpec, os_release: extrelease.OsRelease | None
    ) -> Checkout:
        repo = self._open(source.url)
        try:
            return self._sync_repo(repo, spec, source, os_release)
        finally:
            # libgit2 caches pack files process-wide by path: release them now, or a re-clone
            # into the same path would read the old (maybe corrupt) packs.
            repo.free()

    def _sync_repo(
        self,
        repo: pygit2.Repository,
        spec: MachineSpec,
        source: SourceSpec,
        os_release: extrelease.OsRelease | None,
    ) -> Checkout:
        with phase(spec.name, "fetch (ls-remote, objects)"):
            commit, forced_from = self._fetch(repo, source)
        if forced_from:
            log.warning(
                "%s: %s was force-pushed from %s to %s (following the remote)",
                self.paths.name, source.ref.describe(), forced_from, commit,
            )  # fmt: skip
        revision = f"{source.ref.describe()}@sha1:{commit}"
        try:
            if source.verify is not None:
                signature, payload = _local(lambda: _commit(repo, commit).gpg_signature)
                signed = (signature, payload) if signature else None
                signing.verify_commit(commit, signed, source.verify)
            with phase(spec.name, "checkout, layout"):
                tree = self._checkout(repo, commit)
                if os_release is None:
                    os_release = self._os_release(spec.image)
                layout = load_layout(tree, spec, os_release=os_release)
        except SourceError as exc:
            exc.revision = revision  # status names the refused revision
            raise
        return Checkout(
            commit=commit,
            ref=source.ref.describe(),
            tree=tree,
            layout=layout,
            forced_from=forced_from,
        )

    def _open(self, url: str) -> pygit2.Repository:
        """The tenant's bare repo for `url`; a repo of another URL is dropped, so a commit
        pinned by a spec is only ever found if this remote had it."""
        path = self.paths.repo
        if path.exists():
            try:
                repo = pygit2.Repository(str(path))
            except pygit2.GitError as exc:
                raise LocalCorruption(f"the local repository is unreadable: {exc}") from exc
            if URL_KEY in repo.config and repo.config[URL_KEY] == url:
                return repo
            repo.free()
            safepath.remove_tree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        repo = pygit2.init_repository(str(path), bare=True)
        repo.config[URL_KEY] = url
        return repo

    def _check_allowed(self, url: str) -> None:
        """file:// only under the configured roots: a tenant must not read the host's repos,
        and never the shim's own dirs (another tenant's mirror), even below such a root.
        A network URL must not name the host itself (addresses.py) unless configured."""
        if not url.startswith("file:"):
            pool = ipaddress.ip_network(self.config.machine_network_pool)
            refused = addresses.refusal(url, self.config.source_networks, pool)
            if refused is not None:
                raise SourceNotAllowed(refused)
            return
        wanted = Path(os.path.realpath(unquote(urlsplit(url).path)))
        if any(_within(wanted, d) for d in (self.config.state_dir, self.config.runtime_dir)):
            raise SourceNotAllowed(f"{url}: the shim's own state is never a tenant source")
        if not any(_within(wanted, root) for root in self.config.file_source_roots):
            raise SourceNotAllowed(
                f"{url}: file:// sources are allowed only under the shim's roots"
            )

    def _fetch(self, repo: pygit2.Repository, source: SourceSpec) -> tuple[str, str | None]:
        """Fetch what the ref needs (nothing if the local ref is current): (commit, forced_from)."""
        _drop_partial_packs(self.paths.repo)
        ref = source.ref
        if ref.commit:
            if not _has_commit(repo, ref.commit):
                self._remote(repo, source, lambda r, cb: r.fetch(ALL_REFS, callbacks=cb))
                if not _has_commit(repo, ref.commit):
                    raise RefNotFound(
                        f"commit {ref.commit} is not reachable from any branch or tag of the remote"
                    )
            return ref.commit, None
        local_name = _local_ref(ref)
        before = _target(repo, local_name)
        direct, _ = self._advertised(repo, source)
        if before is None or before[0] != direct or not _has_object(repo, direct):
            refspec = f"+{_remote_ref(ref)}:{local_name}"
            self._remote(repo, source, lambda r, cb: r.fetch([refspec], callbacks=cb))
        after = _target(repo, local_name)
        if after is None:
            raise RefNotFound(f"{ref.kind} {ref.value!r} was not fetched from the remote")
        commit = after[1]
        old = before[1] if before else None
        forced = old if old and old != commit and not _descends(repo, commit, old) else None
        return commit, forced

    def _advertised(self, repo: pygit2.Repository, source: SourceSpec) -> tuple[str, str | None]:
        """(the ref's oid, its peeled commit if advertised) from the remote's ref list."""
        heads = self._remote(repo, source, lambda r, cb: r.list_heads(callbacks=cb))
        size = sum(len(h.name or "") for h in heads)
        if len(heads) > MAX_REFS or size > MAX_REF_NAME_BYTES:
            raise SourceError(
                f"{source.url}: the remote advertises {len(heads)} refs ({size} bytes of "
                f"names), more than the {MAX_REFS} refs / {MAX_REF_NAME_BYTES >> 20} MiB a "
                "source may have: point the source at a repository with fewer branches and tags",
                reason="TooManyRefs",
            )
        name = _remote_ref(source.ref)
        found = {h.name: str(h.oid) for h in heads}
        if name not in found:
            raise RefNotFound(f"{source.ref.kind} {source.ref.value!r} not found on the remote")
        return found[name], found.get(name + "^{}")

    def _remote(
        self,
        repo: pygit2.Repository,
        source: SourceSpec,
        op: Callable[[pygit2.Remote, credentials.Callbacks], T],
    ) -> T:
        """Run one network operation with the spec's credentials; errors become SourceErrors."""
        creds = source.credentials
        home = credentials.write_credentials(self.paths, creds)
        callbacks = _Callbacks(creds, credentials.ssh_user(source.url, creds))
        ssh = credentials.is_ssh(source.url)
        try:
            remote = repo.remotes.create_anonymous(source.url)
            with credentials.libgit2_home(home) if ssh else nullcontext():
                return op(remote, callbacks)
        except SourceError:
            raise
        except (pygit2.GitError, OSError, ValueError, KeyError) as exc:
            raise _classify(str(exc), source) from None

    def _checkout(self, repo: pygit2.Repository, commit: str) -> Path:
        """revisions/<commit>, written once through a temp dir and a rename."""
        dest = self.paths.revision(commit)
        if dest.is_dir() and not dest.is_symlink():
            return dest
        self.paths.revisions.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{commit[:12]}-", dir=self.paths.revisions))
        try:
            _local(lambda: checkout.write_tree(repo, _commit(repo, commit).tree, tmp / "t"))
            os.rename(tmp / "t", dest)
        finally:
            safepath.remove_tree(tmp)
        return dest

    def _os_release(self, image: str) -> dict[str, str] | None:
        """The image's os-release, read without following its symlinks; None if unknown."""
        rootfs = ImagePaths(self.config, image).rootfs
        for rel in _OS_RELEASE:
            try:
                text = safepath.read_bytes(rootfs, rel, 1 << 16).decode("utf-8", "replace")
            except OSError:
                continue
            return extrelease.parse_os_release(text)
        return None


def _drop_partial_packs(repo: Path) -> None:
    """Remove what a fetch cut off by a crash left (libgit2 receives a pack into
    objects/pack/pack_git2_*, renamed when complete): up to MAX_FETCH_BYTES each. Only the
    tenant's own sync, which holds its lock, ever fetches into this repository."""
    for partial in (repo / "objects" / "pack").glob("pack_git2_*"):
        partial.unlink(missing_ok=True)


def _within(path: Path, root: Path) -> bool:
    """Is the resolved `path` `root` (resolved) or below it?"""
    real = Path(os.path.realpath(root))
    return path == real or real in path.parents


def _remote_ref(ref: GitRef) -> str:
    return f"refs/heads/{ref.branch}" if ref.branch else f"refs/tags/{ref.tag}"


def _local_ref(ref: GitRef) -> str:
    return ORIGIN_BRANCH + ref.branch if ref.branch else f"refs/tags/{ref.tag}"


def _local(fn: Callable[[], T]) -> T:
    """Run a read of local objects; libgit2 failing to read them means corruption."""
    try:
        return fn()
    except (pygit2.GitError, KeyError) as exc:
        raise LocalCorruption(f"the local repository is damaged: {exc}") from exc


def _target(repo: pygit2.Repository, name: str) -> tuple[str, str] | None:
    """(the ref's direct target, the commit it peels to), or None without the ref."""
    ref = repo.references.get(name)
    if ref is None:
        return None
    return str(ref.target), _local(lambda: str(ref.peel(pygit2.Commit).id))


def _commit(repo: pygit2.Repository, sha: str) -> pygit2.Commit:
    obj = repo.get(sha)
    if not isinstance(obj, pygit2.Commit):
        raise KeyError(f"{sha} is not a commit in the local repository")
    return obj


def _has_object(repo: pygit2.Repository, oid: str) -> bool:
    return oid in repo


def _has_commit(repo: pygit2.Repository, sha: str) -> bool:
    obj = _local(lambda: repo.get(sha))
    return isinstance(obj, pygit2.Commit)


def _descends(repo: pygit2.Repository, new: str, old: str) -> bool:
    try:
        return bool(repo.descendant_of(new, old))
    except (pygit2.GitError, KeyError):
        return False


def _classify(message: str, source: SourceSpec) -> SourceError:
    """A libgit2 failure as the SourceError it means; secrets scrubbed from the message."""
    creds = source.credentials
    for secret in (creds.password, creds.ssh_private_key) if creds else ():
        if secret is not None and secret.get_secret_value():
            message = message.replace(secret.get_secret_value(), "***")
    url = source.url
    host = urlsplit(url).netloc if "://" in url else url.split(":", 1)[0]
    low = message.replace(url, "").replace(host, "").lower()
    if _CERTIFICATE.search(low):
        if credentials.is_ssh(url):
            return credentials.AuthenticationFailed(
                f"{url}: the server's host key is not in sshKnownHosts (always checked)"
            )
        return credentials.AuthenticationFailed(
            f"{url}: the server's TLS certificate is not trusted"
        )
    if _AUTH.search(low):
        return credentials.AuthenticationFailed(f"{url}: authentication failed ({message})")
    if _CORRUPT.search(low):
        return CorruptRepository(f"{url}: corrupt objects ({message})")
    return SourceError(f"{url}: unreachable ({message})", reason="SourceUnreachable")
