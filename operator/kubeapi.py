"""The official Kubernetes client, as the operator uses it besides kopf: Secrets for
secretRefs, the Tenant status, and kopf's login from the same client configuration."""

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


class StatusWriter:
    """Replaces .status whole (a JSON patch `add /status`): fields that became empty go away,
    which a merge patch would leave behind."""

    def __init__(self, api: k8s.ApiClient) -> None:
        self.custom = k8s.CustomObjectsApi(api)

    async def write(
        self, name: str, status: TenantStatus | HostProfileStatus, plural: str = PLURAL
    ) -> None:
        value = status.model_dump(mode="json", by_alias=True, exclude_none=True)
        ops = [{"op": "add", "path": "/status", "value": value}]
        try:
            await asyncio.to_thread(
                self.custom.patch_cluster_custom_object_status,
                GROUP,
                VERSION,
                plural,
                name,
                ops,
                _content_type="application/json-patch+json",
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
