"""Push webhooks for instant sync: a signed push reconciles the matching tenants now.

GitHub (`X-Hub-Signature-256: sha256=<hmac>`), Gitea/Forgejo/Gogs (`X-Gitea-Signature: <hmac>`)
and GitLab (`X-Gitlab-Token: <secret>`) are accepted; the HMAC is SHA-256 over the raw body
with the shared secret. Anything unsigned or wrongly signed is 401 and triggers nothing. The
payload only says *which repo* moved: what runs is still decided by fetching it (and by its
signature checks), so a forged-but-signed payload can at most cause an early poll.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

log = logging.getLogger("bitbuilder.webhook")

MAX_BODY = 1 << 20
# Payload keys that carry the pushed repository's URLs, per forge.
_URL_KEYS = ("clone_url", "ssh_url", "git_url", "html_url", "url", "git_http_url", "git_ssh_url")
_REPO_OBJECTS = ("repository", "project")


class Triggerable(Protocol):
    async def trigger_url(self, url: str) -> list[str]:
        """Reconcile now whatever follows the repository at `url`; what was triggered."""
        ...


def same_repo(a: str, b: str) -> bool:
    """Do two spellings of a git URL name the same repository (scheme, .git, slash, case)?"""

    def norm(url: str) -> str:
        url = url.strip().lower().rstrip("/")
        url = url.removesuffix(".git")
        url = url.split("://", 1)[-1]
        url = url.split("@", 1)[-1] if "@" in url.split("/", 1)[0] else url
        return url.replace(":", "/", 1) if "/" not in url.split(":", 1)[0] else url

    return norm(a) == norm(b)


class WebhookError(Exception):
    pass


def sign(secret: bytes, body: bytes) -> str:
    """The hex HMAC-SHA256 a forge sends (GitHub prefixes it with 'sha256=')."""
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def authentic(secret: bytes, headers: Any, body: bytes) -> bool:
    """True if one of the forges' signature headers is present and right."""
    github = headers.get("X-Hub-Signature-256")
    if github is not None:
        return hmac.compare_digest(github.encode(), f"sha256={sign(secret, body)}".encode())
    for header in ("X-Gitea-Signature", "X-Forgejo-Signature", "X-Gogs-Signature"):
        value = headers.get(header)
        if value is not None:
            return hmac.compare_digest(value.strip().encode(), sign(secret, body).encode())
    token = headers.get("X-Gitlab-Token")
    if token is not None:
        return hmac.compare_digest(token.encode(), secret)
    return False


def pushed_urls(payload: Any) -> Iterator[str]:
    """Every URL the payload gives for the pushed repository (forges differ in the keys)."""
    if not isinstance(payload, dict):
        return
    for key in _REPO_OBJECTS:
        repo = payload.get(key)
        if isinstance(repo, dict):
            for url_key in _URL_KEYS:
                value = repo.get(url_key)
                if isinstance(value, str) and value:
                    yield value


def make_app(secret: bytes, on_push: Callable[[str], Awaitable[list[str]]]) -> web.Application:
    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        if not authentic(secret, request.headers, body):
            log.warning("webhook: bad or missing signature from %s", request.remote)
            return web.json_response({"error": "bad signature"}, status=401)
        event = request.headers.get("X-GitHub-Event") or request.headers.get("X-Gitea-Event")
        if event == "ping":
            return web.json_response({"pong": True})
        try:
            payload = json.loads(body)
        except ValueError:
            return web.json_response({"error": "body is not JSON"}, status=400)
        triggered: list[str] = []
        for url in dict.fromkeys(pushed_urls(payload)):
            triggered += [t for t in await on_push(url) if t not in triggered]
        log.info("webhook: push to %s triggered %s", next(pushed_urls(payload), "?"), triggered)
        return web.json_response({"triggered": triggered}, status=202)

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post("/", hook)
    app.router.add_post("/hook", hook)
    return app


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise WebhookError(f"--webhook-listen wants HOST:PORT, got {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def read_secret(path: Path | None) -> bytes:
    if path is None:
        raise WebhookError("the webhook needs --webhook-secret-file: unsigned pushes are refused")
    secret = path.read_bytes().strip()
    if len(secret) < 16:
        raise WebhookError(f"webhook secret in {path} is too short (16 bytes at least)")
    return secret


async def start_webhook(
    listen: str, secret_file: Path | None, target: Triggerable
) -> web.AppRunner:
    host, port = parse_listen(listen)
    runner = web.AppRunner(make_app(read_secret(secret_file), target.trigger_url))
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("webhook: listening on http://%s:%d/hook", host, port)
    return runner
