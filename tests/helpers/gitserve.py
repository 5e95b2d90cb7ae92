"""Real git remotes on loopback for tests: git daemon, smart HTTP (git http-backend), sshd.

Every server is a context manager: it picks a free loopback port, waits for readiness with
wait_for (never a sleep) and is stopped in teardown. `TenantRepo` builds a tenant repository
(a work tree plus the bare repo the servers export), commits (optionally SSH- or
GPG-signed), tags, force-pushes and reverts through the git CLI.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from bitbuilder.operator.demohost import free_port, stop_process
from tests.helpers.wait import wait_for

GIT_ENV = {
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "Tenant",
    "GIT_AUTHOR_EMAIL": "tenant@example.invalid",
    "GIT_COMMITTER_NAME": "Tenant",
    "GIT_COMMITTER_EMAIL": "tenant@example.invalid",
    "GIT_TERMINAL_PROMPT": "0",
}


def git(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run the git CLI with no user/system config; returns stdout (stripped)."""
    proc = subprocess.run(
        ["git", *args],
        cwd=cwd,
        env={**os.environ, **GIT_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    return free_port()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@contextmanager
def _listening(argv_for_port: list[str], port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Start a server process and wait until `port` accepts connections."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv_for_port, stdout=out, stderr=out, start_new_session=True)
    try:
        wait_for(
            lambda: proc.poll() is not None or _accepts(port),
            timeout=20,
            what=f"{argv_for_port[0]} on port {port}",
        )
        if proc.poll() is not None:
            raise RuntimeError(f"{argv_for_port[0]} exited: {log.read_text(errors='replace')}")
        yield proc
    finally:
        stop_process(proc, timeout=10)


# --- servers ---------------------------------------------------------------------------------


@dataclass
class Server:
    base: Path  # the folder of bare repositories it exports
    scheme: str
    port: int
    log: Path
    requests: list[tuple[str, str]] = field(default_factory=list)  # HTTP only
    user: str = ""

    def url(self, name: str) -> str:
        if self.scheme == "ssh":
            return f"ssh://{self.user}@127.0.0.1:{self.port}{self.base / name}"
        return f"{self.scheme}://127.0.0.1:{self.port}/{name}"

    def log_count(self, text: str) -> int:
        return self.log.read_text(errors="replace").count(text)


@contextmanager
def git_daemon(base: Path) -> Iterator[Server]:
    """`git daemon` exporting every repository under `base` as git://127.0.0.1:PORT/<name>."""
    port = free_port()
    log = base.parent / f"git-daemon-{port}.log"
    argv = ["git", "daemon", "--reuseaddr", "--listen=127.0.0.1", f"--port={port}"]
    argv += ["--export-all", f"--base-path={base}", "--verbose", "--informative-errors", str(base)]
    with _listening(argv, port, log):
        # each fetch or ls-remote is one "Request upload-pack" line
        yield Server(base=base, scheme="git", port=port, log=log)


class _CgiHandler(BaseHTTPRequestHandler):
    server: _GitHttpServer

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: requests are recorded in Server.requests instead."""

    def _serve(self) -> None:
        parts = urlsplit(self.path)
        self.server.info.requests.append((self.command, parts.path))
        user = self._user()
        if self.server.auth is not None and user is None:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self._body()
        env = {
            "PATH": os.environ["PATH"],
            "GIT_PROJECT_ROOT": str(self.server.info.base),
            "GIT_HTTP_EXPORT_ALL": "1",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": "/dev/null",
            "GATEWAY_INTERFACE": "CGI/1.1",
            "REQUEST_METHOD": self.command,
            "PATH_INFO": unquote(parts.path),
            "QUERY_STRING": parts.query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": self.client_address[0],
            "REMOTE_USER": user or "",
            "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
            "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
        }
        out = subprocess.run(
            ["git", "http-backend"], input=body, env=env, capture_output=True, timeout=60
        ).stdout
        sep = b"\r\n\r\n" if b"\r\n\r\n" in out else b"\n\n"
        head, _, content = out.partition(sep)
        status, headers = 200, []
        for line in head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    def _user(self) -> str | None:
        if self.server.auth is None:
            return ""
        scheme, _, encoded = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(encoded).decode().partition(":")
        except ValueError:
            return None
        return user if (user, password) == self.server.auth else None

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))


class _GitHttpServer(ThreadingHTTPServer):
    daemon_threads = True
    info: Server
    auth: tuple[str, str] | None


@contextmanager
def http_server(
    base: Path, auth: tuple[str, str] | None = None, tls: tuple[Path, Path] | None = None
) -> Iterator[Server]:
    """Smart HTTP through `git http-backend`; with `auth`, HTTP basic auth is required; with
    `tls` (certificate, key), HTTPS."""
    httpd = _GitHttpServer(("127.0.0.1", 0), _CgiHandler)
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    port = int(httpd.server_address[1])
    scheme = "https" if tls else "http"
    httpd.info = Server(base=base, scheme=scheme, port=port, log=base.parent / "http.log")
    httpd.auth = auth
    thread = threading.Thread(target=httpd.serve_forever, name=f"git-http-{port}", daemon=True)
    thread.start()
    try:
        yield httpd.info
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that no CA vouches for: (certificate, key)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    argv = ["openssl", "req", "-x509", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
    argv += ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    argv += ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(argv, check=True, capture_output=True)
    return cert, key


@dataclass(frozen=True)
class SshKeys:
    private_key: str  # the client's private key (OpenSSH format)
    public_key: str
    known_hosts: str  # the server's host key line for its [127.0.0.1]:port


def ssh_keygen(path: Path, comment: str = "test") -> tuple[str, str]:
    """A new ed25519 key pair without passphrase at `path`: (private, public) text."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return path.read_text(), Path(f"{path}.pub").read_text().strip()


@contextmanager
def sshd(base: Path) -> Iterator[tuple[Server, SshKeys]]:
    """An OpenSSH server on loopback with its own host key, accepting one generated user key.

    Logs in as the current user (root in CI); the key is restricted (no pty, no forwarding).
    """
    work = Path(tempfile.mkdtemp(prefix="bb-sshd-"))
    try:
        _, host_pub = ssh_keygen(work / "host_ed25519", "host")
        user_priv, user_pub = ssh_keygen(work / "user_ed25519", "user")
        (work / "authorized_keys").write_text(f"restrict {user_pub}\n")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        port = free_port()
        config = work / "sshd_config"
        config.write_text(
            f"ListenAddress 127.0.0.1:{port}\nHostKey {work}/host_ed25519\n"
            f"PidFile {work}/sshd.pid\nAuthorizedKeysFile {work}/authorized_keys\n"
            "StrictModes no\nUsePAM no\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
            "PermitRootLogin prohibit-password\nLogLevel INFO\n"
        )
        log = work / "sshd.log"
        with _listening(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], port, log):
            user = (
                os.environ.get("USER")
                or subprocess.run(
                    ["id", "-un"], capture_output=True, text=True, check=True
                ).stdout.strip()
            )
            keys = SshKeys(user_priv, user_pub, f"[127.0.0.1]:{port} {host_pub}")
            yield Server(base=base, scheme="ssh", port=port, log=log, user=user), keys
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- signers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signer:
    public_key: str  # what a VerifySpec trusts (an ssh public key line or an armoured key)
    git_args: tuple[str, ...]  # `-c` options that make `git commit -S` use this key
    env: dict[str, str] = field(default_factory=dict)


def ssh_signer(folder: Path, name: str = "signer") -> Signer:
    folder.mkdir(parents=True, exist_ok=True)
    key = folder / f"{name}_ed25519"
    _, public = ssh_keygen(key, name)
    return Signer(public, ("-c", "gpg.format=ssh", "-c", f"user.signingkey={key}"))


@contextmanager
def gpg_signer(name: str = "Signer") -> Iterator[Signer]:
    """A fresh OpenPGP key (no passphrase) in its own GNUPGHOME; its agent killed on exit."""
    home = tempfile.mkdtemp(prefix="bbg")  # short: gpg-agent's socket lives here
    env = {"GNUPGHOME": home}
    run_env = {**os.environ, **env}

    def gpg(*args: str) -> str:
        return subprocess.run(
            ["gpg", "--batch", *args], env=run_env, check=True, capture_output=True, text=True
        ).stdout

    try:
        uid = f"{name} <{name.lower()}@example.invalid>"
        gpg("--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", "never")
        listing = gpg("--with-colons", "--list-secret-keys")
        fpr = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr"))
        armoured = gpg("--armor", "--export", fpr)
        yield Signer(armoured, ("-c", "gpg.format=openpgp", "-c", f"user.signingkey={fpr}"), env)
    finally:
        subprocess.run(["gpgconf", "--kill", "all"], env=run_env, capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


# --- tenant repositories ---------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """A symlink in a tenant tree (its target text is stored, never resolved)."""

    target: str


Content = str | bytes | Link


def write_files(root: Path, files: dict[str, Content]) -> Path:
    """Create (or replace) files, folders on the way and symlinks below `root`; returns root."""
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.is_file():
            path.unlink()
        if isinstance(content, Link):
            path.symlink_to(content.target)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return root


class TenantRepo:
    """A work tree whose commits are pushed to `<base>/<name>`, the bare repo servers export."""

    def __init__(self, base: Path, name: str = "tenant.git") -> None:
        self.bare = base / name
        self.work = base.parent / f"work-{name}"
        base.mkdir(parents=True, exist_ok=True)
        git("init", "-q", "--bare", "-b", "main", str(self.bare))
        git("init", "-q", "-b", "main", str(self.work))
        git("remote", "add", "origin", str(self.bare), cwd=self.work)

    def file_url(self) -> str:
        return f"file://{self.bare}"

    def write(self, files: dict[str, Content]) -> None:
        write_files(self.work, files)

    def remove(self, *rels: str) -> None:
        git("rm", "-r", "-q", "--", *rels, cwd=self.work)

    def commit(
        self,
        files: dict[str, Content] | None = None,
        message: str = "change",
        signer: Signer | None = None,
    ) -> str:
        """Write `files`, commit everything, push the branch; returns the new commit."""
        self.write(files or {})
        git("add", "-A", cwd=self.work)
        args = [*signer.git_args] if signer else []
        git(*args, "commit", "-q", "--allow-empty", *(["-S"] if signer else []), "-m", message,
            cwd=self.work, env=signer.env if signer else None)  # fmt: skip
        self.push()
        return self.head()

    def head(self) -> str:
        return git("rev-parse", "HEAD", cwd=self.work)

    def push(self) -> None:
        git("push", "-q", "--force", "origin", "HEAD:refs/heads/main", cwd=self.work)

    def force_push(self, commit: str) -> None:
        """Move the branch back to `commit` (history rewritten, like `git push --force`)."""
        git("reset", "-q", "--hard", commit, cwd=self.work)
        self.push()

    def revert(self, commit: str, signer: Signer | None = None) -> str:
        args = [*signer.git_args] if signer else []
        git(*args, "revert", "--no-edit", *(["-S"] if signer else []), commit,
            cwd=self.work, env=signer.env if signer else None)  # fmt: skip
        self.push()
        return self.head()

    def tag(self, name: str, commit: str | None = None, annotated: bool = True) -> None:
        args = ["-a", "-m", name] if annotated else []
        git("tag", "-f", *args, name, commit or self.head(), cwd=self.work)
        git("push", "-q", "--force", "origin", f"refs/tags/{name}", cwd=self.work)

    def tree_files(self, commit: str) -> dict[str, str]:
        """{path: blob id} of every file and symlink in `commit` (for exact-tree checks)."""
        out = git("ls-tree", "-r", "--full-tree", commit, cwd=self.work)
        return {line.split("\t", 1)[1]: line.split()[2] for line in out.splitlines() if line}
