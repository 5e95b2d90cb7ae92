"""`bitbuilder webhook`: the push webhook for a cluster.

A signed push (see webhook.py) stamps `bitbuilder.io/reconcile-requested-at` on every Tenant
whose source is the pushed repository; the operator on the tenant's node then syncs it at
once. One receiver serves the whole cluster (a Deployment behind a Service, or loopback on a
node); it needs only `list` and `patch` on tenants.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config

from bitbuilder.operator.api import GROUP, PLURAL, RECONCILE_REQUESTED_ANNOTATION, VERSION
from bitbuilder.operator.webhook import WebhookError, same_repo, start_webhook

log = logging.getLogger("bitbuilder.webhook")


class TenantRequests:
    """Triggers Tenants through the API: the reconcile-request annotation, set to now."""

    def __init__(self, api: k8s.ApiClient) -> None:
        self.custom = k8s.CustomObjectsApi(api)

    async def trigger_url(self, url: str) -> list[str]:
        listing: Any = await asyncio.to_thread(
            self.custom.list_cluster_custom_object, GROUP, VERSION, PLURAL
        )
        items: list[dict[str, Any]] = listing.get("items", [])
        names = [i["metadata"]["name"] for i in items if same_repo(url, _source_url(i))]
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        patch = {"metadata": {"annotations": {RECONCILE_REQUESTED_ANNOTATION: stamp}}}
        for name in names:
            await asyncio.to_thread(
                self.custom.patch_cluster_custom_object,
                GROUP,
                VERSION,
                PLURAL,
                name,
                patch,
                _content_type="application/merge-patch+json",
            )
        return names


def _source_url(tenant: dict[str, Any]) -> str:
    source = (tenant.get("spec") or {}).get("source") or {}
    return str(source.get("url", ""))


async def serve(listen: str, secret_file: Path, api: k8s.ApiClient, stop: asyncio.Event) -> None:
    runner = await start_webhook(listen, secret_file, TenantRequests(api))
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    # Imported here: it loads kopf, which every other `bitbuilder` command can do without.
    from bitbuilder.operator.main import load_kube

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(args.listen, args.secret_file, load_kube(args.kubeconfig), stop)

    try:
        asyncio.run(main())
    except (WebhookError, OSError) as exc:
        log.error("cannot serve the webhook: %s", exc)
        return 2
    except k8s_config.ConfigException as exc:
        log.error("no cluster to talk to: %s (run in a pod, or give --kubeconfig)", exc)
        return 2
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "webhook",
        help="receive signed push webhooks and request a sync of the matching Tenants (cluster)",
        description="GitHub, Gitea/Forgejo and GitLab push webhooks, HMAC-signed with the "
        "secret in --secret-file, stamp bitbuilder.io/reconcile-requested-at on every Tenant "
        "whose spec.source.url is the pushed repository. (Standalone mode has its own: "
        "`bitbuilder run --webhook-listen`.)",
    )
    parser.add_argument(
        "--listen", default="127.0.0.1:9292", metavar="HOST:PORT", help="(default: %(default)s)"
    )
    parser.add_argument("--secret-file", type=Path, required=True, help="the shared secret")
    parser.add_argument(
        "--kubeconfig", type=Path, help="kubeconfig (default: in-cluster, $KUBECONFIG)"
    )
    parser.set_defaults(handler=_run)
