"""The Tenant resource (bitbuilder.io/v1alpha1): the single source of truth.

The CRD schema, defaults, validation and the descriptions `kubectl explain` shows are all
generated from these models (see crd.py). Types shared with the host shim (names, git refs,
durations, quantities, network and extension specs) come from its API contract.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from bitbuilder.hostshim.api import (
    QUANTITY_PATTERN,
    DnsLabel,
    Duration,
    ExtensionRef,
    GitRef,
    GitUrl,
    ImageVerify,
    NetworkSpec,
    RepoPath,
    RepoSetting,
    Runtime,
    Sha256Hex,
    WireModel,
    limit_bounds,
    parse_quantity,
)

GROUP = "bitbuilder.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "Tenant"
URL_NEEDS_VERIFICATION = "image.url needs image.sha256 or image.verify: signature"
PLURAL = "tenants"
SINGULAR = "tenant"
SHORT_NAMES = ["tn"]
CATEGORIES = ["bitbuilder"]
OPERATOR_NAMESPACE = "bitbuilder-system"
RECONCILE_REQUESTED_ANNOTATION = "bitbuilder.io/reconcile-requested-at"
FINALIZER = "bitbuilder.io/machine"


def _positive_quantity(value: str | int) -> str | int:
    if parse_quantity(value) <= 0:
        raise ValueError(f"quantity {value!r} must be greater than zero")
    return value


_POSITIVE_QUANTITY_RULE = (
    "type(self) == int ? self > 0 : "
    r"!self.matches('^[+]?0*(\\.0*)?([eE][+-]?[0-9]+|m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$')"
)

Quantity = Annotated[
    str | int,
    AfterValidator(lambda v: (parse_quantity(v), v)[1]),
    AfterValidator(_positive_quantity),
    Field(
        json_schema_extra={
            "x-kubernetes-int-or-string": True,
            "pattern": QUANTITY_PATTERN,
            # _positive_quantity for the API server: the pattern alone admits 0 and -1.
            "x-kubernetes-validations": [
                {"rule": _POSITIVE_QUANTITY_RULE, "message": "must be greater than zero"}
            ],
        },
    ),
]


class SecretRef(WireModel):
    """A Secret in the operator's namespace (bitbuilder-system); in standalone mode a folder
    `<secrets-dir>/<name>/` with one file per key."""

    name: DnsLabel = Field(description="Name of the Secret.")


class TenantVerify(WireModel):
    """Only commits signed by a trusted key are ever checked out."""

    secret_ref: SecretRef = Field(
        description="Secret whose keys hold trusted public keys: '*.pub' (SSH) and '*.asc' "
        "or '*.gpg' (OpenPGP, ASCII-armoured)."
    )


class TenantSource(WireModel):
    """The tenant's own configuration repository."""

    url: GitUrl
    ref: GitRef = Field(description="What to follow: exactly one of branch, tag or commit.")
    path: RepoPath = Field("", description="Folder inside the repository that holds the layout.")
    interval: Duration = Field("5m", description="How often to check the remote for a new commit.")
    secret_ref: SecretRef | None = Field(
        None,
        description="Credentials: keys 'username'+'password' (https) or 'identity'+'known_hosts' "
        "(ssh).",
    )
    verify: TenantVerify | None = Field(None, description="Require signed commits.")


class TenantImage(WireModel):
    """The base image the machine boots from."""

    name: DnsLabel = Field(description="Name of the image on the host.")
    url: Annotated[str, StringConstraints(max_length=2048)] | None = Field(
        None,
        description="Import the image from this URL (a tarball, or a raw disk image for VMs) "
        "when the host lacks it.",
    )
    sha256: Sha256Hex | None = Field(None, description="Digest the imported file must match.")
    verify: ImageVerify | None = Field(
        None,
        description="checksum (the default): the file must match sha256. signature: "
        "SHA256SUMS beside the url, signed (SHA256SUMS.gpg) by a key the host trusts, must "
        "list the file.",
    )

    @model_validator(mode="after")
    def _url_needs_verification(self) -> TenantImage:
        if self.verify is not None and self.url is None:
            raise ValueError("image.verify needs image.url")
        if self.url is not None and self.sha256 is None and self.verify != ImageVerify.signature:
            raise ValueError(URL_NEEDS_VERIFICATION)
        return self


class TenantResources(WireModel):
    """Limits: cgroup limits for containers, the VM's size for VMs."""

    cpu: Quantity | None = Field(None, description="CPU, e.g. '500m' or 2.")
    memory: Quantity | None = Field(None, description="Memory, e.g. '512Mi'.")
    tasks: int | None = Field(None, ge=8, le=4_194_304, description="Maximum tasks (processes).")
    disk: Quantity | None = Field(None, description="Disk size for VMs, e.g. '10Gi'.")

    def cpu_millis(self) -> int | None:
        return None if self.cpu is None else int(parse_quantity(self.cpu) * 1000)

    def memory_bytes(self) -> int | None:
        return _whole(self.memory)

    def disk_bytes(self) -> int | None:
        return _whole(self.disk)

    @model_validator(mode="after")
    def _within_the_shims_bounds(self) -> TenantResources:
        # The bounds are the shim's (ResourceLimits); checked here so that the refusal names
        # the Tenant's field and unit, not the shim's memory_bytes.
        for field, value, unit in (
            ("cpu", self.cpu_millis(), "m"),
            ("memory", self.memory_bytes(), "bytes"),
            ("disk", self.disk_bytes(), "bytes"),
        ):
            low, high = limit_bounds(f"{field}_{'millis' if unit == 'm' else unit}")
            if value is not None and not low <= value <= high:
                shown = _show_millis if unit == "m" else _show_bytes
                raise ValueError(
                    f"resources.{field} {getattr(self, field)!r} is out of range: "
                    f"give {shown(low)} to {shown(high)}"
                )
        return self


def _whole(value: str | int | None) -> int | None:
    return None if value is None else int(parse_quantity(value).to_integral_value())


def _show_millis(millis: int) -> str:
    return f"{millis}m"


def _show_bytes(size: int) -> str:
    for suffix, power in (("Pi", 50), ("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)):
        if size % 2**power == 0:
            return f"{size // 2**power}{suffix}"
    return str(size)


class NodeLoss(StrEnum):
    """What happens when the node running a tenant is lost (its reservation pod deleted or
    evicted). The machine's writable data is local to that node either way."""

    reschedule = "Reschedule"
    wait = "Wait"


class TenantSpec(WireModel):
    """What the tenant's machine should be."""

    runtime: Runtime = Field(Runtime.nspawn, description="nspawn (container) or vmspawn (VM).")
    image: TenantImage
    source: TenantSource | None = Field(None, description="The tenant's configuration repo.")
    resources: TenantResources = Field(default_factory=TenantResources)
    network: NetworkSpec = Field(default_factory=NetworkSpec, description="Isolated by default.")
    extensions: list[ExtensionRef] | None = Field(
        None, max_length=32, description="sysext/confext trees to layer; unset = all in the repo."
    )
    repo_settings: list[RepoSetting] = Field(
        default_factory=list, description="What the repo's machine.yaml may set."
    )
    suspend: bool = Field(False, description="Stop the machine and keep its data.")
    keep_data_on_delete: bool = Field(False, description="Keep the machine's data on delete.")
    node_name: DnsLabel | None = Field(None, description="Run on this node only.")
    node_selector: dict[str, Annotated[str, StringConstraints(max_length=63)]] = Field(
        default_factory=dict, description="Run on a node whose labels match all of these."
    )
    node_loss: NodeLoss = Field(
        NodeLoss.reschedule,
        description="When the node running the machine is lost (its reservation pod deleted "
        "or evicted): Reschedule places it again and it starts fresh from git on the new node "
        "once the lost node is gone or NotReady; Wait keeps it Pending until that node "
        "returns. Its writable data stays on the lost node either way.",
    )


class TenantPhase(StrEnum):
    pending = "Pending"
    provisioning = "Provisioning"
    running = "Running"
    updating = "Updating"
    suspended = "Suspended"
    failed = "Failed"
    terminating = "Terminating"


class Condition(WireModel):
    """A kstatus-style condition."""

    type: str = Field(description="Ready, Reconciling, Stalled, SourceReady or MachineReady.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason.")
    message: str = Field("", description="What happened, for people.")
    last_transition_time: datetime = Field(description="When the status last changed.")
    observed_generation: int | None = Field(
        None, description="The metadata.generation this condition was computed from."
    )


class SourceStatus(WireModel):
    """The tenant repository as last seen."""

    revision: str | None = Field(None, description="`<ref>@sha1:<sha>` last fetched.")
    url: str | None = Field(None, description="The repository URL fetched.")
    last_checked: datetime | None = Field(None, description="When the remote was last asked.")


class RevisionRecord(WireModel):
    """One revision that ran."""

    revision: str = Field(description="The commit applied.")
    applied_at: datetime = Field(description="When it was applied.")


class MachineInfo(WireModel):
    """Where and since when the machine runs."""

    node: str | None = Field(None, description="The node (host) running the machine.")
    address: str | None = Field(None, description="The machine's address on its host link.")
    started_at: datetime | None = Field(None, description="When the machine last started.")
    drift_corrections: int | None = Field(
        None,
        description="How often the host shim found the host out of step with the applied "
        "revision (a changed extension tree, a stopped machine) and corrected it.",
    )
    last_drift: str | None = Field(None, description="The last correction: when, why, what.")


class TenantStatus(WireModel):
    """Written by the operator; never by users."""

    model_config = ConfigDict(extra="ignore")  # tolerate kopf's own bookkeeping keys

    phase: TenantPhase | None = Field(
        None,
        description="Pending, Provisioning, Running, Updating, Suspended, Failed or Terminating.",
    )
    observed_generation: int | None = Field(
        None, description="The metadata.generation this status answers to."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, Reconciling, Stalled, SourceReady and MachineReady.",
    )
    source: SourceStatus | None = Field(None, description="The tenant repository as last seen.")
    applied_revision: str | None = Field(None, description="Commit running now.")
    short_revision: str | None = Field(
        None, description="The first 7 hex digits of appliedRevision (derived, for printing)."
    )
    history: list[RevisionRecord] = Field(
        default_factory=list, description="Recently applied revisions, newest first."
    )
    machine: MachineInfo | None = Field(None, description="Where and since when it runs.")

    @model_validator(mode="after")
    def _derive_short_revision(self) -> TenantStatus:
        # `kubectl get` columns cannot cut strings, so the short sha is a field of its own.
        commit = (self.applied_revision or "").rpartition("sha1:")[2]
        self.short_revision = commit[:7] or None
        return self


class ObjectMeta(WireModel):
    """The subset of metadata the operator reads; the rest passes through untouched."""

    model_config = ConfigDict(extra="allow")

    name: DnsLabel
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class Tenant(WireModel):
    """A tenant machine (an nspawn container or a vmspawn VM) that follows its own git
    repository on a BitBuilder host."""

    api_version: Literal["bitbuilder.io/v1alpha1"] = Field(
        "bitbuilder.io/v1alpha1", alias="apiVersion"
    )
    kind: Literal["Tenant"] = "Tenant"
    metadata: ObjectMeta
    spec: TenantSpec
    status: TenantStatus | None = None

    @classmethod
    def from_object(cls, obj: dict[str, Any]) -> Tenant:
        """Validate a manifest or an API object (status included if present)."""
        return cls.model_validate(obj)


def validation_message(exc: ValidationError) -> str:
    """One line for people: `where: what` per problem, `;`-separated."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{loc}: {err['msg']}" if loc else str(err["msg"]))
    return "; ".join(parts)


# --- HostProfile: layers on the host itself ---------------------------------------------------

HOST_PROFILE_KIND = "HostProfile"
HOST_PROFILE_PLURAL = "hostprofiles"
HOST_PROFILE_SINGULAR = "hostprofile"
HOST_PROFILE_SHORT_NAMES = ["hp"]


class HostProfileSpec(WireModel):
    """sysext/confext layers merged on the host itself (over its /usr and /etc) from git."""

    source: TenantSource = Field(
        description="The repository holding sysext/<name>/usr/... and confext/<name>/etc/... "
        "trees, each with an extension-release file for the host's os-release."
    )
    extensions: list[ExtensionRef] | None = Field(
        None, max_length=32, description="Trees to merge; unset = all in the repo."
    )
    node_selector: dict[str, Annotated[str, StringConstraints(max_length=63)]] = Field(
        default_factory=dict,
        description="Apply on nodes whose labels match all of these (empty: every node).",
    )


class HostProfilePhase(StrEnum):
    pending = "Pending"
    applied = "Applied"
    failed = "Failed"


class HostProfileStatus(WireModel):
    """Written by the operator of the node that applied it last; never by users."""

    model_config = ConfigDict(extra="ignore")  # tolerate kopf's own bookkeeping keys

    phase: HostProfilePhase | None = Field(None, description="Pending, Applied or Failed.")
    observed_generation: int | None = Field(
        None, description="The metadata.generation this status answers to."
    )
    conditions: list[Condition] = Field(
        default_factory=list, description="Ready, Stalled, Reconciling and SourceReady."
    )
    node: str | None = Field(None, description="The node this status was reported from.")
    source: SourceStatus | None = Field(None, description="The repository as last seen.")
    applied_revision: str | None = Field(None, description="Commit merged on the host now.")
    short_revision: str | None = Field(
        None, description="The first 7 hex digits of appliedRevision (derived, for printing)."
    )
    previous_revision: str | None = Field(
        None, description="The commit merged before, kept on the host for a rollback."
    )
    history: list[RevisionRecord] = Field(
        default_factory=list, description="Recently merged revisions, newest first."
    )

    @model_validator(mode="after")
    def _derive_short_revision(self) -> HostProfileStatus:
        self.short_revision = (self.applied_revision or "")[:7] or None
        return self


class HostProfile(WireModel):
    """Layers for the BitBuilder host itself (systemd-sysext over /usr, systemd-confext over
    /etc), following a git repository; never seen by tenants."""

    api_version: Literal["bitbuilder.io/v1alpha1"] = Field(
        "bitbuilder.io/v1alpha1", alias="apiVersion"
    )
    kind: Literal["HostProfile"] = "HostProfile"
    metadata: ObjectMeta
    spec: HostProfileSpec
    status: HostProfileStatus | None = None

    @classmethod
    def from_object(cls, obj: dict[str, Any]) -> HostProfile:
        return cls.model_validate(obj)
