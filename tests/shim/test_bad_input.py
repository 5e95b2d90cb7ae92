"""Whatever a caller sends, the shim answers 2xx or a 4xx naming the problem — never a 5xx —
and writes nothing outside its state and runtime dirs."""

from __future__ import annotations

import copy
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.gitserve import Link, TenantRepo
from tests.shim.conftest import FakeShim, RealShim, machine_spec, shim_config
from tests.shim.harness import Reply, ShimClient, UnixConnection

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


def assert_client_error_or_ok(reply: Reply) -> None:
    assert reply.status < 500, reply.body
    if reply.status >= 400:
        assert isinstance(reply.body, dict), reply.body
        assert reply.body["error"] and reply.body["message"], reply.body


def assert_refused(reply: Reply, status: int = 422, field: str | None = None) -> None:
    assert reply.status == status, reply.body
    assert reply.body["message"], reply.body
    if field is not None:
        assert reply.body.get("field") == field, reply.body


# --- fuzzing over the fakes -------------------------------------------------------------------


@FUZZ
@given(body=json_values)
def test_random_json_bodies(fake_shim: FakeShim, body: Any) -> None:
    for path in ("/v1/machines/web", "/v1/images/web"):
        assert_client_error_or_ok(fake_shim.client.request("PUT", path, body))


def _paths_of(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(doc, dict):
        for key, value in doc.items():
            found += _paths_of(value, (*prefix, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            found += _paths_of(value, (*prefix, i))
    return found


FULL_SPEC = machine_spec(
    source={
        "url": "https://git.example.com/t.git",
        "ref": {"branch": "main"},
        "path": "machines/web",
        "verify": {"sshKeys": ["ssh-ed25519 AAAA test"]},
    },
    resources={"cpuMillis": 500, "memoryBytes": 2**28, "tasks": 64},
    network={"mode": "isolated", "allowHost": False},
    extensions=[{"name": "base", "type": "confext"}],
    repoSettings=["hostname"],
)


@FUZZ
@given(data=st.data())
def test_mutated_specs(fake_shim: FakeShim, data: st.DataObject) -> None:
    spec = copy.deepcopy(FULL_SPEC)
    where = data.draw(st.sampled_from(_paths_of(spec)[1:]))
    parent = spec
    for key in where[:-1]:
        parent = parent[key]
    action = data.draw(st.sampled_from(["replace", "drop", "unknown"]))
    if action == "replace":
        parent[where[-1]] = data.draw(json_values)
    elif action == "drop" and isinstance(parent, dict):
        del parent[where[-1]]
    elif isinstance(parent, dict):
        parent[data.draw(st.text(min_size=1, max_size=10))] = data.draw(json_values)
    reply = fake_shim.client.request("PUT", "/v1/machines/web", spec)
    assert_client_error_or_ok(reply)


@FUZZ
@given(name=st.text(min_size=1, max_size=80))
def test_random_names_in_the_path(fake_shim: FakeShim, name: str) -> None:
    path = f"/v1/machines/{quote(name, safe='')}"
    for method in ("GET", "DELETE"):
        assert_client_error_or_ok(fake_shim.client.request(method, path))
    assert_client_error_or_ok(fake_shim.client.request("PUT", path, machine_spec(name)))


# --- hand-written hostile cases over the real components -----------------------------------------


def outside_snapshot(tmp_path: Path) -> set[tuple[str, int]]:
    """Every path under tmp_path except the shim's state and runtime dirs, with its mtime."""
    found = set()
    for root, dirs, files in os.walk(tmp_path):
        rel = Path(root).relative_to(tmp_path)
        if rel.parts[:1] in (("state",), ("run",)):
            continue
        for entry in dirs + files:
            if rel == Path(".") and entry in ("state", "run"):
                continue
            found.add((str(rel / entry), os.lstat(Path(root, entry)).st_mtime_ns))
    return found


CANARIES = [Path("/tmp/bb-hostile-canary"), Path("/etc/bb-hostile-canary")]


@pytest.fixture
def guarded(real_shim: RealShim, tmp_path: Path) -> Iterator[RealShim]:
    """The real shim; afterwards nothing outside its state/runtime dirs may have changed."""
    before = outside_snapshot(tmp_path)
    yield real_shim
    assert outside_snapshot(tmp_path) == before
    assert not any(os.path.lexists(c) for c in CANARIES)


TRAVERSALS = [
    "..",
    "../..",
    "../../../tmp/bb-hostile-canary",
    "/etc/bb-hostile-canary",
    "a/../../b",
]

BAD_NAMES = [
    "..",
    "%2e%2e",
    "UPPER",
    "a_b",
    "-a",
    "a-",
    "a" * 64,
    "a%00b",
    "%20web",
    "web%0a",
    "a.b",
    "a%2f..%2f..%2fetc",  # an encoded '/' must not split the name into path segments
    "%2e%2e%2fstate",
    "%252e%252e",  # double-encoded '..'
    "%EF%BD%97eb",  # fullwidth 'w': not an ASCII label
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_in_the_path(guarded: RealShim, name: str) -> None:
    client = guarded.client
    for method in ("GET", "DELETE", "POST"):
        path = f"/v1/machines/{name}" + ("/restart" if method == "POST" else "")
        assert client.request(method, path).status in (404, 422)
    assert_refused(client.request("PUT", f"/v1/machines/{name}", machine_spec("web")), 422, "name")
    assert_refused(client.request("PUT", f"/v1/images/{name}", {"path": "/x"}), 422, "name")


def _spec_with(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    spec = copy.deepcopy(FULL_SPEC)
    parent = spec
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return spec


HOSTILE_FIELDS: list[tuple[tuple[str, ...], str]] = [
    (("image",), "image"),
    (("source", "path"), "source.path"),
    (("source", "url"), "source.url"),
    (("source", "ref", "branch"), "source.ref.branch"),
    (("extensions",), "extensions.0.name"),
]


@pytest.mark.parametrize("traversal", TRAVERSALS)
@pytest.mark.parametrize(("where", "field"), HOSTILE_FIELDS)
def test_traversal_in_string_fields(
    guarded: RealShim, where: tuple[str, ...], field: str, traversal: str
) -> None:
    value: Any = traversal
    if where == ("extensions",):
        value = [{"name": traversal, "type": "sysext"}]
    if where == ("source", "url"):
        value = f"file://{traversal}" if traversal.startswith("/") else traversal
    reply = guarded.client.request("PUT", "/v1/machines/web", _spec_with(where, value))
    if reply.status == 200:  # a well-formed file:// URL: refused by the source, not by the API
        assert reply.body["sourceError"]["reason"] == "SourceNotAllowed", reply.body
        assert reply.body["phase"] == "Failed"
    else:
        assert_refused(reply, 422)
        assert str(reply.body["field"]).startswith(field.split(".")[0]), reply.body


@pytest.mark.parametrize(
    "ref",
    [{"branch": "-x"}, {"branch": "a..b"}, {"tag": "x.lock"}, {"tag": "../../x"},
     {"commit": "../../etc"}, {"branch": "main", "tag": "v1"}, {}],
)  # fmt: skip
def test_bad_refs(guarded: RealShim, ref: dict[str, str]) -> None:
    reply = guarded.client.request("PUT", "/v1/machines/web", _spec_with(("source", "ref"), ref))
    assert_refused(reply, 422)
    assert str(reply.body["field"]).startswith("source.ref"), reply.body


@pytest.mark.parametrize(
    "url",
    ["ext::sh -c touch% /tmp/bb-hostile-canary", "-uhack", "https://u:pw@example.com/x",
     "file://host/etc", "ftp://example.com/x", "https://", "file:relative"],
)  # fmt: skip
def test_bad_urls(guarded: RealShim, url: str) -> None:
    reply = guarded.client.request("PUT", "/v1/machines/web", _spec_with(("source", "url"), url))
    assert_refused(reply, 422, "source.url")


def test_file_urls_outside_the_allowed_roots(guarded: RealShim, tmp_path: Path) -> None:
    sneaky = f"file://{tmp_path}/served/../state"
    for url in ("file:///etc", sneaky):
        reply = guarded.client.request(
            "PUT", "/v1/machines/web", _spec_with(("source", "url"), url)
        )
        assert reply.status == 200
        assert reply.body["sourceError"]["reason"] == "SourceNotAllowed"
        assert "leaderPid" not in reply.body


@pytest.mark.parametrize(
    "image",
    [{"path": "/etc"}, {"path": "../../etc"}, {"path": "/tmp/bb-hostile-canary"},
     {"url": "file:///etc/passwd", "sha256": "0" * 64}, {"url": "ftp://x/y.tar", "sha256": "0" * 64},
     {"url": "file:///etc/passwd"}, {"path": "/x", "url": "file:///y"}],
)  # fmt: skip
def test_hostile_images(guarded: RealShim, tmp_path: Path, image: dict[str, str]) -> None:
    if image.get("path") == "../../etc":
        image = {"path": f"{tmp_path}/images/../../etc"}
    reply = guarded.client.request("PUT", "/v1/images/base", image)
    assert_refused(reply, 422)
    assert guarded.client.request("GET", "/v1/images").body["items"] == []


@pytest.mark.parametrize(
    ("files", "refused"),
    [({"confext/base/etc": Link("/etc")}, True),
     ({"sysext/tools/usr": Link("../../../../../../../tmp")}, True),
     ({"machine.yaml": Link("/etc/hostname")}, True),
     ({"units/evil.service": Link("/etc/passwd")}, True),
     ({"confext/base/etc": Link("/proc/self/root/etc")}, True),
     # from revisions/<sha>/confext/: up to state/tenants/, into another tenant's folder
     ({"confext/base": Link("../../../../victim/data")}, True),
     # Valid inside the machine (its own /etc/shadow): accepted, never followed on the host.
     ({"confext/base/etc/motd": Link("/etc/shadow")}, False)],
)  # fmt: skip
def test_symlinks_in_the_tenant_repo_never_reach_outside(
    real_shim: RealShim, tmp_path: Path, files: dict[str, Link], refused: bool
) -> None:
    repo = TenantRepo(tmp_path / "served", "evil.git")
    repo.commit({"confext/other/etc/motd": "hi\n", **files})
    before = outside_snapshot(tmp_path)
    body = machine_spec(source={"url": repo.file_url(), "ref": {"branch": "main"}})
    reply = real_shim.client.request("PUT", "/v1/machines/web", body)
    assert reply.status == 200, reply.body
    assert reply.body["phase"] == "Failed" and "leaderPid" not in reply.body
    if refused:
        assert reply.body["sourceError"]["reason"] == "InvalidRevision", reply.body
        assert next(iter(files)) in reply.body["sourceError"]["message"]
    else:  # the revision is fine; the machine fails later only because no image exists
        assert reply.body["machineError"]["reason"] == "ImageNotFound", reply.body
    assert outside_snapshot(tmp_path) == before


@pytest.mark.parametrize("target", ["/etc", "/proc/self/root/etc", "{state}/tenants/victim"])
def test_a_linked_source_path_is_refused(real_shim: RealShim, tmp_path: Path, target: str) -> None:
    """spec.source.path itself (or a folder on the way) is a link: never followed."""
    (tmp_path / "state/tenants/victim/data").mkdir(parents=True)
    repo = TenantRepo(tmp_path / "served", "evil.git")
    repo.commit({"hosts": Link(target.format(state=tmp_path / "state"))})
    before = outside_snapshot(tmp_path)
    source = {"url": repo.file_url(), "ref": {"branch": "main"}, "path": "hosts/data"}
    reply = real_shim.client.request("PUT", "/v1/machines/web", machine_spec(source=source))
    assert reply.status == 200, reply.body
    assert reply.body["sourceError"]["reason"] == "InvalidRevision", reply.body
    assert "'hosts' is a symlink" in reply.body["sourceError"]["message"], reply.body
    assert outside_snapshot(tmp_path) == before


def test_unknown_fields_and_wrong_types(guarded: RealShim) -> None:
    client = guarded.client
    assert_refused(
        client.request("PUT", "/v1/machines/web", {**FULL_SPEC, "privileged": True}),
        422,
        "privileged",
    )
    assert_refused(
        client.request("PUT", "/v1/machines/web", _spec_with(("resources", "tasks"), "many")),
        422,
        "resources.tasks",
    )
    assert_refused(
        client.request("PUT", "/v1/machines/web", _spec_with(("suspend",), "yes")), 422, "suspend"
    )
    assert_refused(client.request("PUT", "/v1/machines/web", [FULL_SPEC]), 422)
    assert_refused(client.request("PUT", "/v1/machines/other", FULL_SPEC), 422, "name")
    assert_refused(client.request("DELETE", "/v1/machines/web?keepData=maybe"), 422, "keepData")
    assert_refused(client.request("GET", "/v1/machines?force=1"), 422, "force")


def test_bodies_that_are_not_json(guarded: RealShim) -> None:
    client = guarded.client
    path = "/v1/machines/web"
    assert_refused(client.request("PUT", path, raw=b"{nope"), 400)
    assert_refused(client.request("PUT", path, raw=b"\xff\xfe"), 400)
    assert_refused(client.request("PUT", path, raw=b'{"a": NaN}'), 400)
    assert_refused(client.request("PUT", path, raw=b"[" * 100_000), 400)
    assert_refused(client.request("PUT", path, raw=b"1" * 5000), 400)
    assert_refused(client.request("PUT", path, raw=b"{}", content_type="text/plain"), 415)
    assert_refused(client.request("PUT", path, raw=b"{}", content_type=None), 415)
    assert_refused(
        client.request("PUT", path, raw=b"a=b", content_type="application/x-www-form-urlencoded"),
        415,
    )


def test_oversized_bodies(guarded: RealShim) -> None:
    limit = guarded.config.max_body_bytes
    big = b'{"name": "' + b"a" * limit + b'"}'
    assert_refused(guarded.client.request("PUT", "/v1/machines/web", raw=big), 413)
    # The same without a Content-Length: chunked.
    conn = UnixConnection(str(guarded.config.socket_path), 30)
    try:
        conn.request(
            "PUT", "/v1/machines/web", body=iter([big[i : i + 65536] for i in range(0, len(big), 65536)]),
            headers={"Content-Type": "application/json"}, encode_chunked=True,
        )  # fmt: skip
        assert conn.getresponse().status == 413
    finally:
        conn.close()


def test_unknown_routes_and_methods(guarded: RealShim) -> None:
    client = guarded.client
    for method, path, code in [
        ("GET", "/v2/machines", 404), ("GET", "/", 404), ("GET", "/v1/machines/web/../../etc", 404),
        ("POST", "/v1/machines/web", 405), ("PATCH", "/v1/machines/web", 405),
        ("DELETE", "/v1/images", 405), ("PUT", "/healthz", 405), ("GET", "/v1/machines/web/restart", 405),
    ]:  # fmt: skip
        assert_refused(client.request(method, path), code)
    assert_refused(client.request("GET", "/v1/machines/web"), 404)
    conn = UnixConnection(str(guarded.config.socket_path), 30)
    try:
        conn.request("PATCH", "/v1/machines/web")
        assert set(conn.getresponse().getheader("Allow", "").split(",")) >= {"GET", "PUT", "DELETE"}
    finally:
        conn.close()


# --- peer credentials ------------------------------------------------------------------------------


def test_callers_outside_the_allow_list_get_403(tmp_path: Path) -> None:
    shim = FakeShim(shim_config(tmp_path, allowed_uids=frozenset({12345}))).start()
    try:
        for method, path in [
            ("GET", "/healthz"),
            ("GET", "/v1/machines"),
            ("PUT", "/v1/machines/web"),
            ("GET", "/nope"),
        ]:
            reply = shim.client.request(method, path, machine_spec() if method == "PUT" else None)
            assert_refused(reply, 403)
            assert "uid 0" in reply.body["message"]
        assert shim.runner.starts == []
    finally:
        shim.stop()


_CALL = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b"GET /v1/machines HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
print(s.recv(100).split(b"\\r\\n")[0].decode())
"""

SYSTEM_PYTHON = "/usr/bin/python3"  # the venv's interpreter sits under root's home
SOCKET_GROUP = 4242  # needs no /etc/group entry: only ids matter to the kernel


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder other users can reach (tmp_path's parents are root-only)."""
    folder = Path(tempfile.mkdtemp(prefix="bb-shim-peer-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON), reason="needs root and " + SYSTEM_PYTHON
)
def test_foreign_uid_is_refused_by_peer_credentials(tmp_path: Path, open_dir: Path) -> None:
    config = shim_config(
        tmp_path, socket_path=open_dir / "s.sock", allowed_gids=frozenset({SOCKET_GROUP})
    )
    shim = FakeShim(config).start()
    try:
        sock = config.socket_path.stat()
        assert stat.S_IMODE(sock.st_mode) == 0o660 and sock.st_gid == SOCKET_GROUP

        def call_as(primary_gid: int) -> str:
            result = subprocess.run(
                [SYSTEM_PYTHON, "-I", "-c", _CALL, str(config.socket_path)], cwd="/",
                user=65534, group=primary_gid, extra_groups=[SOCKET_GROUP],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            return result.stdout.strip()

        # The socket's group lets it connect; its own credentials (gid 65534) are not allowed.
        assert call_as(65534).endswith("403 Forbidden")
        assert call_as(SOCKET_GROUP).endswith("200 OK")
    finally:
        shim.stop()


def test_socket_is_private_and_a_stale_one_is_replaced(tmp_path: Path) -> None:
    config = shim_config(tmp_path)
    config.socket_path.parent.mkdir(parents=True)
    import socket as socketlib

    stale = socketlib.socket(socketlib.AF_UNIX)
    stale.bind(str(config.socket_path))
    stale.close()  # bound, never listening: what a killed shim leaves
    shim = FakeShim(config).start()
    try:
        assert stat.S_IMODE(config.socket_path.stat().st_mode) == 0o660
        assert shim.client.request("GET", "/healthz").status == 200
        # A second shim on the same socket refuses to start rather than stealing it.
        second = FakeShim(config)
        with pytest.raises(RuntimeError, match="did not start"):
            second.start()
        assert ShimClient(str(config.socket_path)).request("GET", "/healthz").status == 200
    finally:
        shim.stop()
    assert not config.socket_path.exists()


def test_a_file_at_the_socket_path_is_never_replaced(tmp_path: Path) -> None:
    config = shim_config(tmp_path)
    config.socket_path.parent.mkdir(parents=True)
    config.socket_path.write_text("precious")
    with pytest.raises(RuntimeError, match="did not start"):
        FakeShim(config).start()
    assert config.socket_path.read_text() == "precious"
