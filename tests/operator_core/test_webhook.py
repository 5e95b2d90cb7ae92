"""The push webhook: signatures per forge, URL matching, 401 changes nothing."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from bitbuilder.operator.webhook import (
    WebhookError,
    authentic,
    parse_listen,
    pushed_urls,
    read_secret,
    sign,
    start_webhook,
)

SECRET = b"0123456789abcdef-secret"


class Recorder:
    def __init__(self) -> None:
        self.urls: list[str] = []

    async def trigger_url(self, url: str) -> list[str]:
        self.urls.append(url)
        return ["web"] if url.endswith("web.git") else []


def github(body: bytes, secret: bytes = SECRET) -> dict[str, str]:
    return {"X-Hub-Signature-256": f"sha256={sign(secret, body)}", "X-GitHub-Event": "push"}


BODY = json.dumps(
    {
        "ref": "refs/heads/main",
        "repository": {
            "clone_url": "https://git.example/web.git",
            "html_url": "https://git.example/web",
        },
    }
).encode()


@pytest.mark.parametrize(
    ("headers", "ok"),
    [
        (github(BODY), True),
        ({"X-Gitea-Signature": sign(SECRET, BODY)}, True),
        ({"X-Forgejo-Signature": sign(SECRET, BODY)}, True),
        ({"X-Gitlab-Token": SECRET.decode()}, True),
        (github(BODY, b"another-secret-value"), False),
        ({"X-Hub-Signature-256": sign(SECRET, BODY)}, False),  # missing 'sha256=' prefix
        ({"X-Gitea-Signature": sign(SECRET, BODY + b" ")}, False),
        ({"X-Gitlab-Token": "wrong"}, False),
        ({}, False),
    ],
)
def test_signatures(headers: dict[str, str], ok: bool) -> None:
    assert authentic(SECRET, headers, BODY) is ok


def test_pushed_urls_per_forge() -> None:
    gitlab = {"project": {"git_http_url": "https://gl/x.git", "git_ssh_url": "git@gl:x.git"}}
    assert list(pushed_urls(gitlab)) == ["https://gl/x.git", "git@gl:x.git"]
    assert list(pushed_urls(json.loads(BODY))) == [
        "https://git.example/web.git",
        "https://git.example/web",
    ]
    assert list(pushed_urls([1, 2])) == []


def test_listen_and_secret(tmp_path: Path) -> None:
    assert parse_listen("127.0.0.1:9292") == ("127.0.0.1", 9292)
    assert parse_listen("[::1]:80") == ("::1", 80)
    assert parse_listen(":80") == ("127.0.0.1", 80)
    with pytest.raises(WebhookError):
        parse_listen("localhost")
    with pytest.raises(WebhookError):
        read_secret(None)
    short = tmp_path / "s"
    short.write_text("short\n")
    with pytest.raises(WebhookError, match="too short"):
        read_secret(short)


def test_served_webhook(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET + b"\n")
    recorder = Recorder()

    async def main() -> None:
        runner = await start_webhook("127.0.0.1:0", secret_file, recorder)
        try:
            port = runner.addresses[0][1]
            url = f"http://127.0.0.1:{port}/hook"
            async with aiohttp.ClientSession() as http:
                async with http.post(url, data=BODY, headers=github(BODY)) as ok:
                    assert ok.status == 202
                    assert (await ok.json()) == {"triggered": ["web"]}
                assert recorder.urls == ["https://git.example/web.git", "https://git.example/web"]
                recorder.urls.clear()
                bad = github(BODY, b"not-the-secret-at-all")
                async with http.post(url, data=BODY, headers=bad) as denied:
                    assert denied.status == 401
                async with http.post(url, data=b"not json", headers=github(b"not json")) as junk:
                    assert junk.status == 400
                ping = {**github(b"{}"), "X-GitHub-Event": "ping"}
                async with http.post(url, data=b"{}", headers=ping) as pong:
                    assert pong.status == 200
                assert recorder.urls == []
        finally:
            await runner.cleanup()

    asyncio.run(main())
