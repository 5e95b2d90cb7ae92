"""An emulated Kubernetes API server realistic enough for kopf and kubectl.

kmock 0.8's KubernetesEmulator serves discovery and a naive object store; see
/work/shared/KUBE-EMULATION.md for what breaks with it. This subclass keeps kmock's discovery,
`/version` and request log, and serves every object request itself with the API server's rules:
uid/creationTimestamp/resourceVersion/generation stamping (201 on create, generateName), a
resourceVersion bump on every write, PUT and PATCH (merge, JSON patch, strategic merge as merge)
as whole-object replacement with 409 on a stale resourceVersion, status subresource separation,
the generation rule, finalizers, delete preconditions (uid), ownerReference garbage collection
(background: dependents go when their owner is gone), pods' `binding` subresource (what the
scheduler calls), graceful pod deletion (a pod bound to a NotReady node stays Terminating until
its node is Ready again; PodGC is not emulated), ValidatingAdmissionPolicies stored (not enforced), lists with kind and
resourceVersion, label and field selectors,
watches with timeoutSeconds and resourceVersion replay from an event ring (410 when too old),
pruning/defaulting/validation against a CRD's openAPIV3Schema and CEL rules (422; 400 for
unknown fields with fieldValidation=Strict), Table rendering from its printer columns, `dryRun`,
BOOKMARKs on idle watches, and /openapi/v3 (so `kubectl apply` validates on the server and
`kubectl explain` works).

`EmulatorThread` runs it in its own event loop: kopf runs in another thread and tests are
synchronous.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import itertools
import json
import secrets
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import aiohttp.web
import jsonpatch
import kmock
import yaml

from tests.helpers.kube_schema import (
    Obj,
    ResourceType,
    admit,
    openapi_document,
    openapi_index,
    table,
)
from tests.helpers.kube_selectors import (
    Requirement,
    SelectorError,
    field_values,
    matches,
    parse_selector,
)
from tests.helpers.loop_thread import LoopThread

CORE_TYPES = (
    ResourceType("", "v1", "namespaces", "Namespace", namespaced=False, short_names=("ns",)),
    ResourceType("", "v1", "nodes", "Node", namespaced=False, short_names=("no",)),
    ResourceType(
        "", "v1", "pods", "Pod", namespaced=True, short_names=("po",), status_subresource=True
    ),
    ResourceType("", "v1", "events", "Event", namespaced=True, short_names=("ev",)),
    ResourceType("", "v1", "secrets", "Secret", namespaced=True),
    ResourceType("", "v1", "configmaps", "ConfigMap", namespaced=True, short_names=("cm",)),
    ResourceType("", "v1", "serviceaccounts", "ServiceAccount", namespaced=True),
    ResourceType("apps", "v1", "daemonsets", "DaemonSet", namespaced=True, short_names=("ds",)),
    ResourceType("apps", "v1", "deployments", "Deployment", namespaced=True),
    *(
        ResourceType("rbac.authorization.k8s.io", "v1", plural, kind, namespaced=namespaced)
        for plural, kind, namespaced in (
            ("clusterroles", "ClusterRole", False),
            ("clusterrolebindings", "ClusterRoleBinding", False),
            ("roles", "Role", True),
            ("rolebindings", "RoleBinding", True),
        )
    ),
    *(
        ResourceType("admissionregistration.k8s.io", "v1", plural, kind, namespaced=False)
        for plural, kind in (
            ("validatingadmissionpolicies", "ValidatingAdmissionPolicy"),
            ("validatingadmissionpolicybindings", "ValidatingAdmissionPolicyBinding"),
        )
    ),
    ResourceType(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        namespaced=False,
        short_names=("crd", "crds"),
        status_subresource=True,
    ),
)
VERBS = ("create", "delete", "get", "list", "patch", "update", "watch")
MERGE_PATCHES = ("application/merge-patch+json", "application/strategic-merge-patch+json")
JSON_PATCH = "application/json-patch+json"
_CHANGES = ("ADDED", "MODIFIED", "DELETED")
_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


class ApiStatus(Exception):
    """An error answered as a meta/v1 Status, like the API server does."""

    def __init__(self, code: int, reason: str, message: str, details: Obj | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def body(self) -> Obj:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }


@dataclass(frozen=True)
class Route:
    group: str
    version: str
    plural: str
    namespace: str | None
    name: str | None
    subresource: str | None

    @classmethod
    def parse(cls, path: str) -> Route | None:
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) >= 3:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis" and len(parts) >= 4:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        namespace = None
        # /namespaces/{ns}/{plural}/...; but /namespaces/{name}/status|finalize are subresources
        if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] not in ("status", "finalize"):
            namespace, rest = rest[1], rest[2:]
        name = rest[1] if len(rest) > 1 else None
        return cls(group, version, rest[0], namespace, name, "/".join(rest[2:]) or None)


@dataclass(frozen=True)
class WatchEvent:
    rv: int
    rtype: str
    namespace: str | None
    type: str
    object: Obj


@dataclass
class Watch:
    """One watch request: what it selects and where its events go."""

    rtype: ResourceType
    route: Route
    labels: list[Requirement]
    fields: list[Requirement]
    tabular: bool
    bookmarks: bool
    response: aiohttp.web.StreamResponse

    def wants(self, event: WatchEvent) -> bool:
        meta = event.object["metadata"]
        return (
            event.rtype == self.rtype.key
            and self.route.namespace in (None, event.namespace)
            and self.route.name in (None, meta["name"])
            and matches(self.labels, meta.get("labels", {}))
            and matches(self.fields, field_values(event.object))
        )

    async def send(self, kind: str, obj: Obj, emulator: Emulator) -> None:
        shown = emulator._as_table(self.rtype, obj) if self.tabular and kind in _CHANGES else obj
        await self.response.write(json.dumps({"type": kind, "object": shown}).encode() + b"\n")

    async def bookmark(self, rv: int, emulator: Emulator, initial_end: bool = False) -> None:
        meta: Obj = {"resourceVersion": str(rv)}
        if initial_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        body = {"kind": self.rtype.kind, "apiVersion": self.rtype.api_version, "metadata": meta}
        await self.send("BOOKMARK", body, emulator)


def established(crd: Obj) -> Obj:
    """A CRD's status once the API server serves it."""
    conditions = [
        {"type": kind, "status": "True", "reason": reason, "lastTransitionTime": now()}
        for kind, reason in (
            ("NamesAccepted", "NoConflicts"),
            ("Established", "InitialNamesAccepted"),
        )
    ]
    return {"conditions": conditions, "acceptedNames": crd["spec"]["names"]}


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Emulator(kmock.KubernetesEmulator):
    """The API server. Pass CRDs (dicts) to serve their resources from the start; CRDs POSTed
    to apiextensions.k8s.io/v1 are served too."""

    def __init__(
        self,
        crds: Iterable[Obj] = (),
        *,
        log_size: int = 500,
        ring_size: int = 2000,
        watch_timeout: float = 600.0,
        bookmark_interval: float = 30.0,
    ) -> None:
        super().__init__()
        self.log_size = log_size
        self.watch_timeout = watch_timeout
        self.bookmark_interval = bookmark_interval
        self.types: dict[tuple[str, str, str], ResourceType] = {}
        self.store: dict[tuple[str, str | None, str], Obj] = {}
        self.rv = 0
        self.ring: collections.deque[WatchEvent] = collections.deque(maxlen=ring_size)
        self.ring_floor = 0  # events up to this resourceVersion have left the ring
        self.changed = asyncio.Condition()
        self.closing = False
        for rtype in CORE_TYPES:
            self.serve(rtype)
        for crd in crds:
            self.serve(ResourceType.from_crd(crd))

    def serve(self, rtype: ResourceType) -> None:
        """Declare a resource: discovery lists it and its objects are stored."""
        self.types[rtype.group, rtype.version, rtype.plural] = rtype
        self.resources[rtype.key] = kmock.ResourceInfo(
            kind=rtype.kind,
            namespaced=rtype.namespaced,
            singular=rtype.singular or rtype.kind.lower(),
            shortnames=set(rtype.short_names),
            categories=set(rtype.categories),
            verbs=set(VERBS),
            subresources={"status"} if rtype.status_subresource else set(),
        )

    # ---- HTTP entry ----------------------------------------------------------------------

    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if raw.path.startswith("/openapi/v3"):
            return self._openapi(raw.path.removeprefix("/openapi/v3").strip("/"))
        route = Route.parse(raw.path)
        rtype = (
            None if route is None else self.types.get((route.group, route.version, route.plural))
        )
        if route is None or rtype is None:
            return await super().__call__(raw)  # discovery, /version, 404s: kmock's scaffold
        body = await raw.read()
        self._log(raw, route, body)
        try:
            if raw.method == "GET" and raw.query.get("watch") in ("true", "1"):
                return await self._watch(raw, route, rtype)
            code, payload = self._serve(raw, route, rtype, body)
        except ApiStatus as e:
            code, payload = e.code, e.body()
        except SelectorError as e:
            code, payload = 400, ApiStatus(400, "BadRequest", str(e)).body()
        if code < 300 and raw.method != "GET":
            await self._notify()
        if code < 300 and "as=Table" in raw.headers.get("Accept", ""):
            payload = self._as_table(rtype, payload)
        return aiohttp.web.json_response(payload, status=code)

    async def _serve_version(self, request: kmock.Request) -> Any:
        """kmock's resource list, with the core group's groupVersion `v1` (kmock says `/v1`,
        and kubectl then finds no core kinds at all)."""
        payload: Obj = cast(Obj, await super()._serve_version(request))
        payload["groupVersion"] = payload["groupVersion"].lstrip("/")
        return payload

    def _openapi(self, root: str) -> aiohttp.web.Response:
        if not root:
            return aiohttp.web.json_response(openapi_index(list(self.types.values())))
        served = [t for t in self.types.values() if t.api_root == root]
        if not served:
            return aiohttp.web.json_response(ApiStatus(404, "NotFound", root).body(), status=404)
        return aiohttp.web.json_response(openapi_document(served))

    def _log(self, raw: aiohttp.web.BaseRequest, route: Route, body: bytes) -> None:
        """Keep kmock's request log (for assertions), bounded: kmock's routing scans it whole."""
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        self._requests.append(
            kmock.Request(
                id=len(self._requests),
                method=raw.method,
                url=raw.url,
                params=dict(raw.query),
                headers=dict(raw.headers),
                body=body,
                data=data,
                resource=kmock.resource(route.group, route.version, route.plural),
                namespace=route.namespace,
                name=route.name,
                subresource=route.subresource,
            )
        )
        del self._requests[: -self.log_size]

    def _serve(
        self, raw: aiohttp.web.BaseRequest, route: Route, rtype: ResourceType, body: bytes
    ) -> tuple[int, Obj]:
        if route.subresource == "binding" and rtype.kind == "Pod" and raw.method == "POST":
            key = (rtype.key, route.namespace, route.name or "")
            return 201, self._bind(rtype, key, _object(body))
        if route.subresource not in (None, "status") or (
            route.subresource == "status" and not rtype.status_subresource
        ):
            raise ApiStatus(404, "NotFound", "the server could not find the requested resource")
        if rtype.namespaced != (route.namespace is not None) and (
            route.name is not None or raw.method == "POST"
        ):
            raise ApiStatus(404, "NotFound", f"{rtype.plural} is namespaced={rtype.namespaced}")
        dry_run = raw.query.get("dryRun") == "All"
        if route.name is None:
            if raw.method == "GET":
                return 200, self._list(raw, route, rtype)
            if raw.method == "POST":
                return 201, self._create(raw, route, rtype, _object(body), dry_run)
            raise ApiStatus(405, "MethodNotAllowed", f"{raw.method} on a collection")
        key = (rtype.key, route.namespace, route.name)
        if raw.method == "GET":
            return 200, self._get(rtype, key)
        if raw.method == "PUT":
            return 200, self._update(raw, rtype, key, _object(body), route.subresource, dry_run)
        if raw.method == "PATCH":
            candidate = self._patched(raw, rtype, key, body)
            return 200, self._update(raw, rtype, key, candidate, route.subresource, dry_run)
        if raw.method == "DELETE":
            wanted_uid = ((_json(body) or {}).get("preconditions") or {}).get("uid")
            if wanted_uid and wanted_uid != self._get(rtype, key)["metadata"]["uid"]:
                raise ApiStatus(
                    409,
                    "Conflict",
                    f"Precondition failed: UID in precondition: {wanted_uid}, UID in object "
                    f"meta: {self._get(rtype, key)['metadata']['uid']}",
                )
            return 200, self._delete(rtype, key, dry_run)
        raise ApiStatus(405, "MethodNotAllowed", f"{raw.method} is not supported")

    # ---- reads ---------------------------------------------------------------------------

    def _get(self, rtype: ResourceType, key: tuple[str, str | None, str]) -> Obj:
        if key not in self.store:
            raise ApiStatus(
                404,
                "NotFound",
                f'{rtype.plural}.{rtype.group or "core"} "{key[2]}" not found',
                {"name": key[2], "group": rtype.group, "kind": rtype.plural},
            )
        return self.store[key]

    def _matching(
        self, raw: aiohttp.web.BaseRequest, route: Route, rtype: ResourceType
    ) -> Iterator[Obj]:
        labels = parse_selector(raw.query.get("labelSelector", ""))
        fields = parse_selector(raw.query.get("fieldSelector", ""))
        for (kind, namespace, name), obj in sorted(self.store.items(), key=_sort_key):
            if kind != rtype.key or route.namespace not in (None, namespace):
                continue
            if route.name is not None and name != route.name:
                continue
            if matches(labels, obj["metadata"].get("labels", {})) and matches(
                fields, field_values(obj)
            ):
                yield obj

    def _list(self, raw: aiohttp.web.BaseRequest, route: Route, rtype: ResourceType) -> Obj:
        return {
            "apiVersion": rtype.api_version,
            "kind": f"{rtype.kind}List",
            "metadata": {"resourceVersion": str(self.rv)},
            "items": list(self._matching(raw, route, rtype)),
        }

    def _as_table(self, rtype: ResourceType, payload: Obj) -> Obj:
        if payload.get("kind") == "Status":
            return payload
        items = payload.get("items", [payload])
        return table(rtype, items, payload["metadata"].get("resourceVersion", str(self.rv)))

    # ---- writes --------------------------------------------------------------------------

    def _create(
        self, raw: aiohttp.web.BaseRequest, route: Route, rtype: ResourceType, obj: Obj, dry: bool
    ) -> Obj:
        meta = obj.setdefault("metadata", {})
        while not meta.get("name") and meta.get("generateName"):
            # 5 characters of the API server's alphabet; on a clash, draw again (as it does)
            suffix = "".join(secrets.choice(_NAME_ALPHABET) for _ in range(5))
            if (rtype.key, route.namespace, meta["generateName"] + suffix) not in self.store:
                meta["name"] = meta["generateName"] + suffix
        if not meta.get("name"):
            raise self._invalid(
                rtype, "", ["metadata.name: Required value: name or generateName is required"]
            )
        if not rtype.namespaced:
            meta.pop("namespace", None)  # the API server clears it on cluster-scoped objects
        if meta.get("namespace", route.namespace) != route.namespace:
            raise ApiStatus(400, "BadRequest", "the namespace of the object does not match the URL")
        key = (rtype.key, route.namespace, meta["name"])
        if key in self.store:
            raise ApiStatus(
                409,
                "AlreadyExists",
                f'{rtype.plural}.{rtype.group or "core"} "{meta["name"]}" already exists',
                {"name": meta["name"], "group": rtype.group, "kind": rtype.plural},
            )
        obj["apiVersion"], obj["kind"] = rtype.api_version, rtype.kind
        if route.namespace is not None:
            meta["namespace"] = route.namespace
        if rtype.status_subresource:
            obj.pop("status", None)  # status is written through /status only
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now())
        for field in ("resourceVersion", "deletionTimestamp", "generation"):
            meta.pop(field, None)
        if rtype.custom:
            meta["generation"] = 1
        self._admit(raw, rtype, obj)
        if rtype.kind == "CustomResourceDefinition":
            obj["status"] = established(obj)
            if not dry:
                self.serve(ResourceType.from_crd(obj))
        return obj if dry else self._commit(rtype, key, obj, "ADDED")

    def _patched(
        self, raw: aiohttp.web.BaseRequest, rtype: ResourceType, key: Any, body: bytes
    ) -> Obj:
        current = copy.deepcopy(self._get(rtype, key))
        kind = raw.content_type
        patched: Obj
        if kind in MERGE_PATCHES:
            patched = merge_patch(current, _object(body))
            return patched
        if kind == JSON_PATCH:
            try:
                patched = jsonpatch.apply_patch(current, _json(body))
                return patched
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                raise ApiStatus(422, "Invalid", f"the server rejected our request: {e}") from e
        raise ApiStatus(
            415,
            "UnsupportedMediaType",
            f"the body of the request was in an unknown format - accepted media types include: {', '.join((*MERGE_PATCHES, JSON_PATCH))}",
        )

    def _update(
        self,
        raw: aiohttp.web.BaseRequest,
        rtype: ResourceType,
        key: tuple[str, str | None, str],
        candidate: Obj,
        subresource: str | None,
        dry: bool,
    ) -> Obj:
        """PUT and PATCH end here with a whole candidate object."""
        old = self._get(rtype, key)
        meta = candidate.get("metadata") or {}
        wanted_rv = meta.get("resourceVersion")
        if raw.method == "PUT" and not wanted_rv:
            raise self._invalid(
                rtype,
                key[2],
                ["metadata.resourceVersion: Invalid value: 0: must be specified for an update"],
            )
        if wanted_rv and wanted_rv != old["metadata"]["resourceVersion"]:
            raise ApiStatus(
                409,
                "Conflict",
                f"Operation cannot be fulfilled on {rtype.plural}.{rtype.group or 'core'} "
                f'"{key[2]}": the object has been modified; please apply your changes to the '
                "latest version and try again",
                {"name": key[2], "group": rtype.group, "kind": rtype.plural},
            )
        if meta.get("name", key[2]) != key[2]:
            raise ApiStatus(400, "BadRequest", "the name of the object does not match the URL")
        if subresource == "status":
            new = {**copy.deepcopy(old), "status": candidate.get("status")}
            if new["status"] is None:
                del new["status"]
        else:
            new = candidate
            new["metadata"] = {**meta}
            if rtype.status_subresource:
                new.pop("status", None)
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
        fixed = ("uid", "creationTimestamp", "deletionTimestamp", "generation", "namespace", "name")
        for field in fixed:
            new["metadata"].pop(field, None)
            if field in old["metadata"]:
                new["metadata"][field] = old["metadata"][field]
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        new["apiVersion"], new["kind"] = rtype.api_version, rtype.kind
        self._admit(raw, rtype, new, old)
        if rtype.custom and _spec_of(new, rtype) != _spec_of(old, rtype):
            new["metadata"]["generation"] = old["metadata"]["generation"] + 1
        if new == old or dry:
            return new  # a no-op write changes nothing, not even the resourceVersion
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            return self._commit(rtype, key, new, "DELETED")
        if rtype.kind == "CustomResourceDefinition":
            self.serve(ResourceType.from_crd(new))  # a changed CRD is served as changed
        return self._commit(rtype, key, new, "MODIFIED")

    def _delete(self, rtype: ResourceType, key: tuple[str, str | None, str], dry: bool) -> Obj:
        obj = copy.deepcopy(self._get(rtype, key))
        if dry:
            return obj
        if rtype.kind == "Pod" and self._node_down(obj["spec"].get("nodeName")):
            # Graceful deletion: only the node's kubelet ends it, so it stays Terminating
            # while its node is NotReady (a Ready node's kubelet confirms at once).
            if not obj["metadata"].get("deletionTimestamp"):
                obj["metadata"]["deletionTimestamp"] = now()
                return self._commit(rtype, key, obj, "MODIFIED")
            return obj
        if obj["metadata"].get("finalizers"):
            if obj["metadata"].get("deletionTimestamp"):
                return obj
            obj["metadata"]["deletionTimestamp"] = now()
            if rtype.custom:
                obj["metadata"]["generation"] += 1
            return self._commit(rtype, key, obj, "MODIFIED")
        return self._commit(rtype, key, obj, "DELETED")

    def _bind(self, rtype: ResourceType, key: tuple[str, str | None, str], binding: Obj) -> Obj:
        """POST pods/{name}/binding: set spec.nodeName once, as the API server does for the
        scheduler (a second binding is a 409)."""
        pod = copy.deepcopy(self._get(rtype, key))
        node = (binding.get("target") or {}).get("name")
        if not node:
            raise self._invalid(rtype, key[2], ["target.name: Required value"])
        if pod["spec"].get("nodeName"):
            raise ApiStatus(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on pods/binding "{key[2]}": pod {key[2]} is '
                f'already assigned to node "{pod["spec"]["nodeName"]}"',
            )
        pod["spec"]["nodeName"] = node
        self._commit(rtype, key, pod, "MODIFIED")
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}

    def _node_down(self, name: str | None) -> bool:
        """A node that exists and does not report Ready (pods of deleted nodes go at once)."""
        node = self.store.get(("/v1/nodes", None, name or ""))
        conditions = (node or {}).get("status", {}).get("conditions") or []
        ready = next((c for c in conditions if c.get("type") == "Ready"), None)
        return ready is not None and ready.get("status") != "True"

    def _kubelet_returns(self, node: Obj) -> None:
        """A node Ready again: its kubelet ends the pods deleted meanwhile."""
        if self._node_down(node["metadata"]["name"]):
            return
        for key, obj in list(self.store.items()):
            bound = (obj.get("spec") or {}).get("nodeName") == node["metadata"]["name"]
            if obj.get("kind") == "Pod" and bound and obj["metadata"].get("deletionTimestamp"):
                rtype = next(t for t in self.types.values() if t.key == key[0])
                self._delete(rtype, key, dry=False)

    def _collect_dependents(self, uid: str) -> None:
        """Background garbage collection: objects owned by a deleted object go too."""
        for key, obj in list(self.store.items()):
            owners = obj["metadata"].get("ownerReferences") or []
            if any(ref.get("uid") == uid for ref in owners):
                rtype = next(t for t in self.types.values() if t.key == key[0])
                self._delete(rtype, key, dry=False)

    def _admit(
        self, raw: aiohttp.web.BaseRequest, rtype: ResourceType, obj: Obj, before: Obj | None = None
    ) -> None:
        result = admit(rtype, obj, before)
        if result.pruned and raw.query.get("fieldValidation") == "Strict":
            unknown = ", ".join(f'unknown field "{p}"' for p in result.pruned)
            raise ApiStatus(400, "BadRequest", f"strict decoding error: {unknown}")
        if result.errors:
            raise self._invalid(rtype, obj["metadata"].get("name", ""), result.errors)

    @staticmethod
    def _invalid(rtype: ResourceType, name: str, errors: list[str]) -> ApiStatus:
        kind = f"{rtype.kind}.{rtype.group}" if rtype.group else rtype.kind
        return ApiStatus(
            422,
            "Invalid",
            f'{kind} "{name}" is invalid: ' + ", ".join(errors),
            {
                "name": name,
                "group": rtype.group,
                "kind": rtype.kind,
                "causes": [{"reason": "FieldValueInvalid", "message": e} for e in errors],
            },
        )

    def _commit(
        self, rtype: ResourceType, key: tuple[str, str | None, str], obj: Obj, kind: str
    ) -> Obj:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        if kind == "DELETED":
            self.store.pop(key, None)
        else:
            self.store[key] = obj
        if len(self.ring) == self.ring.maxlen:
            self.ring_floor = self.ring[0].rv
        self.ring.append(WatchEvent(self.rv, rtype.key, key[1], kind, copy.deepcopy(obj)))
        if kind == "DELETED":
            self._collect_dependents(obj["metadata"]["uid"])
        elif rtype.kind == "Node":
            self._kubelet_returns(obj)
        return obj

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    # ---- watch ---------------------------------------------------------------------------

    async def _watch(
        self, raw: aiohttp.web.BaseRequest, route: Route, rtype: ResourceType
    ) -> aiohttp.web.StreamResponse:
        """A watch: the initial state (unless resuming from a resourceVersion), then every change
        from the event ring until timeoutSeconds; 410 Gone if the ring no longer reaches back."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(raw.query.get("timeoutSeconds") or self.watch_timeout)
        since = raw.query.get("resourceVersion", "")
        if not since.isdigit() and since != "":
            raise ApiStatus(400, "BadRequest", f"invalid resourceVersion {since!r}")
        initial = raw.query.get("sendInitialEvents") == "true"
        watch = Watch(
            rtype,
            route,
            parse_selector(raw.query.get("labelSelector", "")),
            parse_selector(raw.query.get("fieldSelector", "")),
            tabular="as=Table" in raw.headers.get("Accept", ""),
            bookmarks=raw.query.get("allowWatchBookmarks") == "true",
            response=aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"}),
        )
        await watch.response.prepare(raw)
        try:
            cursor = self.rv if since in ("", "0") or initial else int(since)
            if since in ("", "0") or initial:
                for obj in list(self._matching(raw, route, rtype)):
                    await watch.send("ADDED", obj, self)
            if initial:
                await watch.bookmark(cursor, self, initial_end=True)
            await self._follow(watch, cursor, deadline)
            await watch.response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client went away
        return watch.response

    async def _follow(self, watch: Watch, cursor: int, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        while not self.closing:
            if cursor < self.ring_floor:
                gone = ApiStatus(410, "Expired", f"too old resource version: {cursor}")
                await watch.send("ERROR", gone.body(), self)
                return
            for event in self._events_after(cursor):
                cursor = event.rv
                if watch.wants(event):
                    await watch.send(event.type, event.object, self)
                    quiet_since = loop.time()
            now = loop.time()
            if now >= deadline:
                return
            if watch.bookmarks and now - quiet_since >= self.bookmark_interval:
                await watch.bookmark(cursor, self)
                quiet_since = now
            wait = min(deadline, quiet_since + self.bookmark_interval) - now
            async with self.changed:
                if cursor >= self.rv and not self.closing:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.changed.wait(), max(wait, 0.0))

    def _events_after(self, rv: int) -> list[WatchEvent]:
        """The ring's events newer than `rv`, oldest first (walking back only that far)."""
        newer = list(itertools.takewhile(lambda event: event.rv > rv, reversed(self.ring)))
        return newer[::-1]

    async def close_watches(self) -> None:
        """End every open watch (so the HTTP server can shut down promptly)."""
        self.closing = True
        await self._notify()

    # ---- for tests -----------------------------------------------------------------------

    def get_object(self, rtype_key: str, namespace: str | None, name: str) -> Obj | None:
        """A copy of a stored object; call it on the emulator's loop (EmulatorThread.call)."""
        obj = self.store.get((rtype_key, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None


# ---- helpers -------------------------------------------------------------------------------


def _json(body: bytes) -> Any:
    try:
        return json.loads(body) if body else {}
    except ValueError as e:
        raise ApiStatus(400, "BadRequest", f"the body is not JSON: {e}") from e


def _object(body: bytes) -> Obj:
    """A request body that must be one object (POST, PUT, merge patches)."""
    value = _json(body)
    if not isinstance(value, dict):
        raise ApiStatus(400, "BadRequest", "the body must be a JSON object")
    return value


def _sort_key(item: tuple[tuple[str, str | None, str], Obj]) -> tuple[str, str, str]:
    (kind, namespace, name), _ = item
    return kind, namespace or "", name


def _spec_of(obj: Obj, rtype: ResourceType) -> Obj:
    """What the generation follows: everything but metadata (and status, if a subresource)."""
    skip = {"metadata", "status"} if rtype.status_subresource else {"metadata"}
    return {k: v for k, v in obj.items() if k not in skip}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class EmulatorThread:
    """The emulator and kmock's HTTP server on 127.0.0.1, in a thread with its own loop."""

    def __init__(self, emulator: Emulator) -> None:
        self.emulator = emulator
        self.thread = LoopThread("kube-emulator")
        self._server: kmock.Server | None = None
        self.url = ""

    def __enter__(self) -> EmulatorThread:
        self.thread.start()
        self.url = self.thread.call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.call(self._stop())
        self.thread.stop()

    async def _start(self) -> str:
        # asyncio primitives bind to the loop that first uses them: build them here.
        self.emulator.changed = asyncio.Condition()
        await self.emulator.__aenter__()
        self._server = kmock.Server(self.emulator)
        await self._server.__aenter__()
        return str(self._server.url).rstrip("/")

    async def _stop(self) -> None:
        await self.emulator.close_watches()
        if self._server is not None:
            await self._server.__aexit__(None, None, None)
        await self.emulator.__aexit__(None, None, None)

    def get(self, rtype_key: str, name: str, namespace: str | None = None) -> Obj | None:
        """A stored object, read safely from the test's thread."""

        async def read() -> Obj | None:
            return self.emulator.get_object(rtype_key, namespace, name)

        return self.thread.call(read())

    def write_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig for kubectl (and the official client) pointing at the emulator."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulated", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "emulated"}}],
            "contexts": [
                {"name": "emulated", "context": {"cluster": "emulated", "user": "tester"}}
            ],
            "current-context": "emulated",
        }
        path.write_text(yaml.safe_dump(config))
        return path
