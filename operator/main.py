"""`bitbuilder-operator`: the kopf operator for one node, talking to that node's host shim."""

from __future__ import annotations

import argparse
import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path

import kopf
import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from bitbuilder.operator.api import OPERATOR_NAMESPACE
from bitbuilder.operator.handlers import Driver, build_registry, run_operator
from bitbuilder.operator.kubeapi import KubeSecrets, StatusWriter, client_login
from bitbuilder.operator.reconcile import Node
from bitbuilder.operator.shimclient import DEFAULT_SOCKET, ShimClient

log = logging.getLogger("bitbuilder.operator")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitbuilder-operator",
        description="Reconcile Tenants (bitbuilder.io/v1alpha1) through this node's host shim.",
    )
    parser.add_argument(
        "--socket",
        type=Path,
        default=DEFAULT_SOCKET,
        help="host shim socket (default: %(default)s)",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace", action="append", default=[], help="only these namespaces (repeatable)"
    )
    scope.add_argument(
        "--clusterwide",
        action="store_true",
        help="all namespaces (the default; Tenants are cluster-scoped)",
    )
    parser.add_argument(
        "--node-name",
        default=os.environ.get("NODE_NAME") or socket.gethostname(),
        help="this node, for spec.nodeName (default: $NODE_NAME or the host name)",
    )
    parser.add_argument(
        "--node-label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label of this node, for spec.nodeSelector (repeatable; added to the labels "
        "of the Node object, which are read when allowed)",
    )
    parser.add_argument(
        "--secrets-namespace",
        default=OPERATOR_NAMESPACE,
        help="where secretRefs are looked up (default: %(default)s)",
    )
    parser.add_argument(
        "--liveness",
        default="http://0.0.0.0:8080/healthz",
        help="liveness endpoint URL; empty to disable (default: %(default)s)",
    )
    parser.add_argument(
        "--kubeconfig", type=Path, help="kubeconfig (default: in-cluster, $KUBECONFIG)"
    )
    parser.add_argument("--verbose", action="store_true")
    return parser


def load_kube(kubeconfig: Path | None) -> k8s.ApiClient:
    """In a pod: the service account; elsewhere: a kubeconfig ($KUBECONFIG, ~/.kube/config)."""
    config = k8s.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST") and kubeconfig is None:
        k8s_config.load_incluster_config(client_configuration=config)  # type: ignore[no-untyped-call]
    else:
        path = str(kubeconfig) if kubeconfig else os.environ.get("KUBECONFIG") or None
        k8s_config.load_kube_config(config_file=path, client_configuration=config)  # type: ignore[no-untyped-call]
    return k8s.ApiClient(config)


def node_labels(api: k8s.ApiClient, name: str) -> dict[str, str]:
    """This node's labels from the cluster (for spec.nodeSelector); none if it cannot be read."""
    try:
        node = k8s.CoreV1Api(api).read_node(name)
    except (ApiException, OSError, urllib3.exceptions.HTTPError) as exc:
        log.warning("cannot read node %s's labels (%s); using --node-label only", name, exc)
        return {}
    return dict((node.metadata.labels if node.metadata else None) or {})


def parse_labels(pairs: Sequence[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"bitbuilder-operator: --node-label wants KEY=VALUE, got {pair!r}")
        labels[key] = value
    return labels


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    kopf.configure(verbose=args.verbose)
    try:
        api = load_kube(args.kubeconfig)
    except (k8s_config.ConfigException, OSError) as exc:
        log.error(
            "no cluster to talk to: %s (run in a pod, or give --kubeconfig / $KUBECONFIG)", exc
        )
        return 2
    driver = Driver(
        shim=ShimClient(args.socket),
        secrets=KubeSecrets(api, args.secrets_namespace),
        status=StatusWriter(api),
        node=Node(args.node_name, node_labels(api, args.node_name) | parse_labels(args.node_label)),
    )
    run_operator(
        build_registry(driver, client_login(api)),
        namespaces=args.namespace or None,
        liveness=args.liveness or None,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
