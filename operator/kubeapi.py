"""The official Kubernetes client, as the operator uses it besides kopf: Secrets for
secretRefs, the Tenant status, reservation pods and nodes (placement), and kopf's login from the
same client configuration."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from typing import Any

import kopf
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from bitbuilder.operator.api import (
    GROUP,
    OPERATOR_NAMESPACE,
    PLURAL,
    VERSION,
    HostProfileStatus,
    TenantStatus,
)
from bitbuilder.operator.placement import TENANT_LABEL, Obj
from bitbuilder.operator.translate import SecretData, SecretNotFound

Login = Callable[..., Any]


class KubeSecrets:
    """Secrets from the cluster, in the operator's namespace only (SecretResolver)."""

    def __init__(self, api: k8s.ApiClient, namespace: str = OPERATOR_NAMESPACE) -> None:
        self.core = k8s.CoreV1Api(api)
        self.namespace = namespace

    async def read(self, name: str) -> SecretData:
        try:
            secret = await asyncio.to_thread(self.core.read_namespaced_secret, name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                raise SecretNotFound(name, f"in namespace {self.namespace}") from None
            raise
        return {key: base64.b64decode(value) for key, value in (secret.data or {}).items()}


class KubePods:
    """Reservation pods in the operator's namespace, and nodes (read only): placement.py's I/O."""

    def __init__(self, api: k8s.ApiClient, namespace: str = OPERATOR_NAMESPACE) -> None:
        self.core = k8s.CoreV1Api(api)
        self.namespace = namespace

    async def of(self, tenant: str) -> list[Obj]:
        """The tenant's reservation pods (one, or more while old ones terminate)."""
        pods = await asyncio.to_thread(
            self.core.list_namespaced_pod, self.namespace, label_selector=f"{TENANT_LABEL}={tenant}"
        )
        return [self._plain(pod) for pod in pods.items]

    async def _read(self, name: str) -> Obj | None:
        try:
            pod = await asyncio.to_thread(self.core.read_namespaced_pod, name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return self._plain(pod)

    async def list(self) -> list[Obj]:
        pods = await asyncio.to_thread(
            self.core.list_namespaced_pod, self.namespace, label_selector=TENANT_LABEL
        )
        return [self._plain(pod) for pod in pods.items]

    async def create(self, pod: Obj) -> Obj:
        """Create it, or return the one another node's operator created first."""
        try:
            # The client sends a plain dict as it is; its stubs only know its models.
            create: Any = self.core.create_namespaced_pod
            made = await asyncio.to_thread(create, self.namespace, pod)
        except ApiException as exc:
            existing = await self._read(pod["metadata"]["name"]) if exc.status == 409 else None
            if existing is None:
                raise
            return existing
        return self._plain(made)

    async def delete(self, name: str, uid: str) -> None:
        """Delete exactly that pod (a uid precondition: never its replacement)."""
        options = k8s.V1DeleteOptions(preconditions=k8s.V1Preconditions(uid=uid))
        try:
            await asyncio.to_thread(
                self.core.delete_namespaced_pod, name, self.namespace, body=options
            )
        except ApiException as exc:
            if exc.status not in (404, 409):  # gone, or already replaced
                raise

    def _plain(self, model: object) -> Obj:
        """The client's typed model as the API's own JSON (camelCase keys)."""
        return dict(self.core.api_client.sanitize_for_serialization(model))

    async def node_lost(self, name: str) -> bool:
        """The node object is gone, or its kubelet stopped reporting Ready."""
        try:
            node = await asyncio.to_thread(self.core.read_node, name)
        except ApiException as exc:
            if exc.status == 404:
                return True
            raise
        conditions = (self._plain(node).get("status") or {}).get("conditions") or []
        ready = next((c for c in conditions if c.get("type") == "Ready"), None)
        return ready is not None and ready.get("status") != "True"


class StatusWriter:
    """Replaces .status whole (a JSON patch `add /status`): fields that became empty go away,
    which a merge patch would leave behind."""

    def __init__(self, api: k8s.ApiClient) -> None:
        self.custom = k8s.CustomObjectsApi(api)

    async def write(
        self, name: str, status: TenantStatus | HostProfileStatus, plural: str = PLURAL
    ) -> None:
        value = status.model_dump(mode="json", by_alias=True, exclude_none=True)
        await self._patch(name, [{"op": "add", "path": "/status", "value": value}], plural=plural)

    async def write_waiting(self, name: str, status: TenantStatus) -> None:
        """Only phase, conditions and observedGeneration (a merge patch): a node that does not
        run the machine never writes `machine`, the holder's field."""
        value = status.model_dump(mode="json", by_alias=True, exclude_none=True)
        keys = ("phase", "observedGeneration", "conditions")
        patch = {"status": {key: value[key] for key in keys if key in value}}
        await self._patch(name, patch, "application/merge-patch+json")

    async def release_holder(self, name: str, node: str) -> None:
        """Clear status.machine.node if (and only if) it still names `node`."""
        test = {"op": "test", "path": "/status/machine/node", "value": node}
        try:
            await self._patch(name, [test, {"op": "remove", "path": "/status/machine/node"}])
        except ApiException as exc:
            if exc.status != 422:  # the test failed: someone else holds it, or nobody
                raise

    async def _patch(
        self,
        name: str,
        body: Obj | list[Obj],
        kind: str = "application/json-patch+json",
        plural: str = PLURAL,
    ) -> None:
        try:
            await asyncio.to_thread(
                self.custom.patch_cluster_custom_object_status,
                GROUP,
                VERSION,
                plural,
                name,
                body,
                _content_type=kind,
            )
        except ApiException as exc:
            if exc.status != 404:  # deleted meanwhile: nothing to report on
                raise


def client_login(api: k8s.ApiClient) -> Login:
    """A kopf login handler using the official client's configuration (loaded once, in-cluster
    or from a kubeconfig), so kopf and our status/secret calls use the same credentials."""

    def login(**_: Any) -> kopf.ConnectionInfo:
        config = api.configuration
        header = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix(
            "authorization"
        )
        scheme, _sep, token = (header or "").rpartition(" ")
        return kopf.ConnectionInfo(
            server=config.host,
            ca_path=config.ssl_ca_cert,
            insecure=not config.verify_ssl,
            username=config.username or None,
            password=config.password or None,
            scheme=scheme or None,
            token=token or None,
            certificate_path=config.cert_file,
            private_key_path=config.key_file,
        )

    return login
