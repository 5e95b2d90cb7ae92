"""A tiny synchronous Kubernetes REST client for tests: exact requests, status codes visible."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

Obj = dict[str, Any]
TENANTS = "/apis/bitbuilder.io/v1alpha1/tenants"


class Kube:
    def __init__(self, url: str) -> None:
        self.url = url

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        accept: str = "application/json",
    ) -> tuple[int, Obj]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", content_type)
        request.add_header("Accept", accept)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def ok(self, method: str, path: str, body: Any = None, **kwargs: str) -> Obj:
        """A request that must succeed; returns the body."""
        code, answer = self.request(method, path, body, **kwargs)
        assert code < 300, f"{method} {path} -> {code}: {answer.get('message', answer)}"
        return answer

    def get(self, path: str) -> Obj | None:
        code, answer = self.request("GET", path)
        return None if code == 404 else answer

    def merge(self, path: str, patch: Obj) -> Obj:
        return self.ok("PATCH", path, patch, content_type="application/merge-patch+json")

    def watch(self, path: str, **params: str) -> Iterator[Obj]:
        """Events of one watch request, until the server ends it."""
        query = "&".join(f"{k}={v}" for k, v in {"watch": "true", **params}.items())
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=30) as response:
            for line in response:
                if line.strip():
                    yield json.loads(line)
