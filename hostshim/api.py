"""The host shim's API: MachineSpec in, MachineStatus out.

This module is the contract between the operator and the shim. The operator imports it (and
nothing else from the shim); the shim's server validates every request body with it. Every
string that later becomes a path, an argument or a file on the host is constrained here first.
"""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    model_validator,
)
from pydantic.alias_generators import to_camel

API_VERSION = "v1"

# --- primitive types shared with the operator's Tenant models ---------------------------------

DNS1123_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

DnsLabel = Annotated[
    str,
    StringConstraints(min_length=1, max_length=63, pattern=DNS1123_LABEL_PATTERN),
    Field(description="A DNS-1123 label: lower-case letters, digits and '-', at most 63."),
]

GitCommit = Annotated[
    str,
    StringConstraints(min_length=40, max_length=40, pattern=r"^[0-9a-f]{40}$"),
    Field(description="A full 40-hex git commit id."),
]

Sha256Hex = Annotated[
    str,
    StringConstraints(min_length=64, max_length=64, pattern=r"^[0-9a-f]{64}$"),
    Field(description="A sha256 digest, 64 lower-case hex digits."),
]

_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


def check_git_ref_name(value: str) -> str:
    """Refuse what `git check-ref-format` refuses, plus anything that looks like an option."""
    problems = []
    if value.startswith(("-", "/")) or value.endswith(("/", ".", ".lock")):
        problems.append("must not start with '-' or '/' nor end with '/', '.' or '.lock'")
    if ".." in value or "//" in value or "@{" in value or value == "@":
        problems.append("must not contain '..', '//' or '@{'")
    if _REF_FORBIDDEN.search(value):
        problems.append("must not contain spaces, control characters or any of ~^:?*[\\")
    if any(part.startswith(".") for part in value.split("/")):
        problems.append("no path component may start with '.'")
    if problems:
        raise ValueError(f"invalid git ref name {value!r}: " + "; ".join(problems))
    return value


GitRefName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=255),
    AfterValidator(check_git_ref_name),
]

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: str) -> float:
    """Seconds in a Go-style duration ("1m30s", "500ms", "2h")."""
    if not re.fullmatch(DURATION_PATTERN, value):
        raise ValueError(f"invalid duration {value!r}: expected e.g. '30s', '5m', '1h30m'")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(value))


Duration = Annotated[
    str,
    StringConstraints(max_length=32, pattern=DURATION_PATTERN),
    AfterValidator(lambda v: (parse_duration(v), v)[1]),
]

QUANTITY_PATTERN = (
    r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+|m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
)
_QUANTITY_SUFFIX: dict[str, Decimal] = {
    "": Decimal(1), "m": Decimal("0.001"),
    "k": Decimal(10) ** 3, "M": Decimal(10) ** 6, "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12, "P": Decimal(10) ** 15, "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40, "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60,
}  # fmt: skip


def parse_quantity(value: str | int) -> Decimal:
    """The value of a Kubernetes quantity ("500m", "2", "512Mi", "1e3")."""
    # No strip(): the API server matches the CRD pattern against the raw string, so ' 1' or
    # '0\r' must be refused here too, or the models and the server disagree.
    text = str(value)
    match = re.fullmatch(QUANTITY_PATTERN, text)
    if not match:
        raise ValueError(f"invalid quantity {value!r}: expected e.g. '500m', '2', '512Mi', '1Gi'")
    number, _, suffix = match.group(1), match.group(2), match.group(3) or ""
    try:
        if suffix[:1] in ("e", "E"):
            return Decimal(number + suffix)
        return Decimal(number) * _QUANTITY_SUFFIX[suffix]
    except InvalidOperation as exc:  # pragma: no cover - the pattern admits only numbers
        raise ValueError(f"invalid quantity {value!r}") from exc


_SCP_LIKE = re.compile(r"^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:[^:]")
ALLOWED_URL_SCHEMES = ("https", "http", "ssh", "git", "file")


def check_git_url(value: str) -> str:
    """Accept only plain transports; never credentials inside the URL, never `ext::` helpers."""
    if any(ord(c) < 0x21 or c == "\x7f" for c in value):
        raise ValueError("git URL must not contain spaces or control characters")
    if value.startswith("-"):
        raise ValueError("git URL must not start with '-'")
    if "::" in value.split("/", 1)[0]:
        raise ValueError("git remote helpers ('transport::address') are not allowed")
    if _SCP_LIKE.match(value):
        return value
    parts = urlsplit(value)
    if parts.scheme not in ALLOWED_URL_SCHEMES:
        allowed = ", ".join(ALLOWED_URL_SCHEMES)
        raise ValueError(f"git URL scheme {parts.scheme!r} is not allowed (use one of {allowed})")
    if parts.password is not None:
        raise ValueError("git URL must not carry a password: use a credentials secret")
    # A token in the user part or the query would show in status and logs with the URL.
    if parts.scheme in ("http", "https") and (parts.username is not None or parts.query):
        raise ValueError(
            "an http(s) git URL must not carry a user, token or query: use a credentials secret"
        )
    if parts.fragment:
        raise ValueError("git URL must not have a '#fragment'")
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValueError("file:// URL must be an absolute local path")
    elif not parts.hostname:
        raise ValueError("git URL needs a host")
    return value


GitUrl = Annotated[
    str,
    StringConstraints(min_length=1, max_length=2048),
    AfterValidator(check_git_url),
    Field(
        description="The repository URL: https://, http://, ssh://, git://, file:// or scp-like."
    ),
]


def check_relative_path(value: str) -> str:
    """A relative path inside a repository: no '..', no absolute path, no empty components."""
    if value in ("", "."):
        return ""
    if value.startswith("/") or "\\" in value or "\x00" in value:
        raise ValueError(f"path {value!r} must be relative, with '/' separators")
    parts = value.strip("/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"path {value!r} must not contain '.', '..' or empty components")
    if any(p.startswith(".git") for p in parts):
        raise ValueError(f"path {value!r} must not name git metadata")
    return "/".join(parts)


RepoPath = Annotated[
    str,
    StringConstraints(max_length=255),
    AfterValidator(check_relative_path),
    Field(description="A directory inside the repository, relative to its root ('' = root)."),
]

ExtensionName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"),
    AfterValidator(lambda v: check_relative_path(v) and v),
    Field(description="An extension's name: letters, digits, '_', '.', '-'."),
]


class WireModel(BaseModel):
    """camelCase on the wire, unknown fields refused: a typo is an error, not a silent no-op."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        str_strip_whitespace=False,
        validate_default=True,
    )

    def wire(self) -> dict[str, object]:
        """The JSON-ready form, with aliases and without unset optionals."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# --- MachineSpec -----------------------------------------------------------------------------


class Runtime(StrEnum):
    """How the machine runs."""

    nspawn = "nspawn"
    vmspawn = "vmspawn"


class GitRef(WireModel):
    """Exactly one of branch, tag or commit."""

    branch: GitRefName | None = Field(None, description="Follow the head of this branch.")
    tag: GitRefName | None = Field(None, description="Check out this tag.")
    commit: GitCommit | None = Field(None, description="Pin this exact commit (40 hex).")

    @model_validator(mode="after")
    def _exactly_one(self) -> GitRef:
        given = [k for k in ("branch", "tag", "commit") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"exactly one of branch, tag or commit must be set (got {given or 'none'})"
            )
        return self

    @property
    def kind(self) -> Literal["branch", "tag", "commit"]:
        return "branch" if self.branch else "tag" if self.tag else "commit"

    @property
    def value(self) -> str:
        return self.branch or self.tag or self.commit or ""

    def describe(self) -> str:
        """How status names the ref: `main`, `v1.2` or the commit itself."""
        return self.value


class GitCredentials(WireModel):
    """Credentials for the tenant repo, resolved by the operator from a Secret.

    Either username+password (https basic auth or a token) or an ssh private key with the
    server's known_hosts lines. The shim keeps them only under its state dir, mode 0600.
    """

    username: str | None = Field(None, max_length=256)
    password: SecretStr | None = Field(None, max_length=8192)
    ssh_private_key: SecretStr | None = Field(None, max_length=65536)
    ssh_known_hosts: str | None = Field(None, max_length=65536)

    @model_validator(mode="after")
    def _one_kind(self) -> GitCredentials:
        basic = self.password is not None
        ssh = self.ssh_private_key is not None
        if basic == ssh:
            raise ValueError(
                "credentials need either a password (with username) or an sshPrivateKey"
            )
        if ssh and not self.ssh_known_hosts:
            raise ValueError("sshPrivateKey needs sshKnownHosts: host keys are always checked")
        return self

    def wire_secret(self) -> dict[str, object]:
        """The JSON form with secrets revealed: only for the request body to the shim."""
        data = self.wire()
        for key, field in (("password", self.password), ("sshPrivateKey", self.ssh_private_key)):
            if field is not None:
                data[key] = field.get_secret_value()
        return data


class VerifySpec(WireModel):
    """Trusted signing keys: a commit must be signed by one of them or it is never checked out."""

    ssh_keys: list[Annotated[str, StringConstraints(max_length=16384)]] = Field(
        default_factory=list, max_length=64,
        description="Trusted SSH public keys ('ssh-ed25519 AAAA... comment').",
    )  # fmt: skip
    gpg_keys: list[Annotated[str, StringConstraints(max_length=262144)]] = Field(
        default_factory=list,
        max_length=64,
        description="Trusted ASCII-armoured OpenPGP public keys.",
    )

    @model_validator(mode="after")
    def _some_key(self) -> VerifySpec:
        if not self.ssh_keys and not self.gpg_keys:
            raise ValueError("verify needs at least one trusted key (sshKeys or gpgKeys)")
        return self


class SourceSpec(WireModel):
    """The tenant's configuration repository."""

    url: GitUrl
    ref: GitRef = Field(description="The branch, tag or commit to follow.")
    path: RepoPath = ""
    credentials: GitCredentials | None = None
    verify: VerifySpec | None = None


class ResourceLimits(WireModel):
    """Limits in plain units; the operator converts Kubernetes quantities."""

    cpu_millis: int | None = Field(None, ge=10, le=1_024_000, description="CPU in millicores.")
    memory_bytes: int | None = Field(None, ge=16 * 2**20, le=2**50, description="Memory limit.")
    tasks: int | None = Field(None, ge=8, le=4_194_304, description="Maximum processes/threads.")
    disk_bytes: int | None = Field(
        None,
        ge=2**26,
        le=2**50,
        description="Disk size: a VM's disk, a container's writable layer.",
    )


def limit_bounds(field: str) -> tuple[int, int]:
    """ResourceLimits' (ge, le) for `field`: every other check of a limit takes them from here."""
    low = high = None
    for rule in ResourceLimits.model_fields[field].metadata:
        low = getattr(rule, "ge", low)
        high = getattr(rule, "le", high)
    assert isinstance(low, int) and isinstance(high, int), field
    return low, high


class PortForward(WireModel):
    port: int = Field(ge=1, le=65535, description="Port inside the machine.")
    host_port: int = Field(ge=1024, le=65535, description="Port on the host's loopback.")
    protocol: Literal["tcp", "udp"] = Field("tcp", description="tcp or udp.")


class NetworkMode(StrEnum):
    isolated = "isolated"  # own namespace + one link to the host, nothing to other tenants
    none = "none"  # own namespace, loopback only


class NetworkSpec(WireModel):
    mode: NetworkMode = Field(
        NetworkMode.isolated,
        description="isolated: own namespace with one link to the host; none: loopback only.",
    )
    allow_host: bool = Field(
        False, description="May the machine reach the host's address on its link."
    )
    ports: list[PortForward] = Field(
        default_factory=list, max_length=32, description="Ports forwarded from the host."
    )


class ExtensionType(StrEnum):
    sysext = "sysext"  # layered over /usr (and /opt)
    confext = "confext"  # layered over /etc


class ExtensionRef(WireModel):
    """A tree in the tenant repo: `<path>/<type>/<name>/`."""

    name: ExtensionName
    type: ExtensionType = Field(description="sysext (layered over /usr) or confext (over /etc).")


RepoSetting = Literal["hostname", "environment"]


def _reveal_credentials(data: dict[str, object], source: SourceSpec | None) -> dict[str, object]:
    """`data` (a spec's wire form) with the source's credentials in clear."""
    if source is not None and source.credentials is not None:
        wire_source = data["source"]
        assert isinstance(wire_source, dict)
        wire_source["credentials"] = source.credentials.wire_secret()
    return data


class MachineSpec(WireModel):
    """Desired state of one machine. PUT twice with the same body: nothing changes."""

    name: DnsLabel
    runtime: Runtime = Runtime.nspawn
    image: DnsLabel = Field(description="Name of a base image imported on this host.")
    source: SourceSpec | None = None
    resources: ResourceLimits = Field(default_factory=ResourceLimits)
    network: NetworkSpec = Field(default_factory=NetworkSpec)
    extensions: list[ExtensionRef] | None = Field(
        None, max_length=32, description="Trees to layer; None = every tree the repo has."
    )
    repo_settings: list[RepoSetting] = Field(
        default_factory=list, description="Settings the tenant repo's machine.yaml may set."
    )
    suspend: bool = Field(False, description="Stop the machine, keep its data.")
    keep_data_on_delete: bool = False

    def wire_secret(self) -> dict[str, object]:
        """The JSON form with credentials revealed: only for the request body to the shim and
        the shim's own 0600 state file."""
        return _reveal_credentials(self.wire(), self.source)


# --- MachineStatus ---------------------------------------------------------------------------


class MachinePhase(StrEnum):
    pending = "Pending"  # accepted, not started yet (source or image being prepared)
    starting = "Starting"
    running = "Running"
    updating = "Updating"
    stopped = "Stopped"  # suspended on purpose
    failed = "Failed"  # cannot run at all (no good revision yet, image missing, crash loop)


class ErrorInfo(WireModel):
    reason: str = Field(description="A CamelCase reason, e.g. SourceUnreachable, InvalidRevision.")
    message: str
    revision: str | None = None
    at: datetime


class AppliedRevision(WireModel):
    revision: GitCommit
    applied_at: datetime


class MachineStatus(WireModel):
    name: DnsLabel
    phase: MachinePhase
    runtime: Runtime
    spec_hash: str = Field(description="Hash of the desired spec this status answers to.")
    source_revision: str | None = Field(None, description="`<ref>@sha1:<sha>` last fetched.")
    applied_revision: GitCommit | None = None
    history: list[AppliedRevision] = Field(default_factory=list)
    leader_pid: int | None = None
    address: str | None = None
    acceleration: str | None = Field(
        None, description="A VM's: kvm or tcg (software emulation, where KVM is unusable)."
    )
    started_at: datetime | None = None
    source_error: ErrorInfo | None = None
    machine_error: ErrorInfo | None = None
    drift_corrections: int = Field(
        0, description="How often the shim found the host out of step with the applied revision."
    )
    last_drift: ErrorInfo | None = Field(
        None, description="The last correction: MachineRestarted, RevisionTreeModified, ..."
    )


class MachineList(WireModel):
    items: list[MachineStatus]
    continue_: str | None = Field(
        None,
        alias="continue",
        description="More machines follow: ask again with this as `continue` (same `limit`).",
    )


# --- images ----------------------------------------------------------------------------------


class ImageVerify(StrEnum):
    checksum = "checksum"
    signature = "signature"


class ImageType(StrEnum):
    directory = "directory"
    raw = "raw"


class ImageSpec(WireModel):
    """Where a base image comes from, and how it is verified before anything is unpacked.

    A URL names a tarball (a root filesystem: .tar, .tar.gz, .tar.xz, .tar.zst) or a raw disk
    image (.raw or .img: a GPT disk for VMs). A path names a directory or a raw image under one
    of the shim's trusted image paths.
    """

    url: Annotated[str, StringConstraints(max_length=2048)] | None = Field(
        None, description="http(s):// or file:// of a tarball or a raw disk image (.raw, .img)."
    )
    path: Annotated[str, StringConstraints(max_length=1024)] | None = Field(
        None,
        description="A directory or a raw disk image under one of the shim's trusted image paths.",
    )
    sha256: Sha256Hex | None = Field(None, description="The file's sha256 (checksum).")
    verify: ImageVerify | None = Field(
        None,
        description="checksum (the default for a url): the file must match sha256. signature: "
        "SHA256SUMS beside the url must be signed (SHA256SUMS.gpg) by a key the host trusts "
        "and list the file with its sha256 (as systemd-importd's --verify=signature).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ImageSpec:
        if (self.url is None) == (self.path is None):
            raise ValueError("an image needs exactly one of url or path")
        if self.verify is ImageVerify.signature:
            if self.url is None:
                raise ValueError("verify: signature needs a url (SHA256SUMS is fetched beside it)")
        elif self.url is not None and self.sha256 is None:
            raise ValueError("an image url needs its sha256, or verify: signature")
        return self


class ImageStatus(WireModel):
    name: DnsLabel
    type: ImageType = ImageType.directory
    sha256: str | None = None
    size_bytes: int
    imported_at: datetime
    source: str
    verification: str | None = Field(
        None,
        description="How it was verified: sha256, signature (with the key's fingerprint) or "
        "trusted-path.",
    )
    used_by: list[DnsLabel] = Field(
        default_factory=list, description="Tenants whose desired or running spec names it."
    )


class ImageList(WireModel):
    items: list[ImageStatus]


class ApiError(WireModel):
    """Every 4xx/5xx body."""

    error: str = Field(description="A CamelCase code, e.g. ValidationFailed, NotFound.")
    message: str
    field: str | None = None


# --- host layers -----------------------------------------------------------------------------


class HostLayersSpec(WireModel):
    """Layers merged on the host itself (systemd-sysext / systemd-confext), from a git source.

    The operator sends one per HostProfile selecting this node. The repo has the tenant repo's
    sysext/ and confext/ trees (no units/, no machine.yaml); each tree must carry an
    extension-release file that systemd would accept for the host's os-release."""

    name: DnsLabel = Field(description="The HostProfile's name.")
    source: SourceSpec
    extensions: list[ExtensionRef] | None = Field(
        None, max_length=32, description="Trees to merge; None = every tree the repo has."
    )

    def wire_secret(self) -> dict[str, object]:
        """The JSON form with credentials revealed: only for the request body to the shim and
        the shim's own 0600 state file."""
        return _reveal_credentials(self.wire(), self.source)


class HostLayersPhase(StrEnum):
    pending = "Pending"  # accepted, nothing merged yet
    applied = "Applied"  # the applied revision's trees are merged
    failed = "Failed"  # nothing could be merged (no good revision yet)


class HostLayersStatus(WireModel):
    name: DnsLabel
    phase: HostLayersPhase
    spec_hash: str = Field(description="Hash of the desired spec this status answers to.")
    source_revision: str | None = Field(None, description="`<ref>@sha1:<sha>` last fetched.")
    applied_revision: GitCommit | None = None
    previous_revision: GitCommit | None = Field(
        None, description="The revision applied before, kept on disk for a rollback."
    )
    history: list[AppliedRevision] = Field(default_factory=list)
    sysext: list[ExtensionName] = Field(default_factory=list, description="Merged over /usr.")
    confext: list[ExtensionName] = Field(default_factory=list, description="Merged over /etc.")
    source_error: ErrorInfo | None = None
    merge_error: ErrorInfo | None = None


class HostLayersList(WireModel):
    items: list[HostLayersStatus]
