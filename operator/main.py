"""`bitbuilder-operator`: the kopf operator for one node, talking to that node's host shim."""

from __future__ import annotations

import argparse
import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path

import kopf
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from bitbuilder.operator.api import OPERATOR_NAMESPACE
from bitbuilder.operator.handlers import Driver, build_registry, run_operator
from bitbuilder.operator.kubeapi import KubePods, KubeSecrets, StatusWriter, client_login
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
    parser.add_argument(
        "--node-name",
        default=os.environ.get("NODE_NAME") or socket.gethostname(),
        help="this node: the tenants whose reservation pod is bound to it run here "
        "(default: $NODE_NAME or the host name)",
    )
    parser.add_argument(
        "--namespace",
        default=OPERATOR_NAMESPACE,
        help="where the reservation pods live (default: %(default)s)",
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
        node=Node(args.node_name),
        pods=KubePods(api, args.namespace),
    )
    run_operator(
        build_registry(driver, client_login(api)),
        namespace=args.namespace,
        liveness=args.liveness or None,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
