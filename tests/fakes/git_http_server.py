"""A git smart-HTTP server for tests: `git http-backend` as CGI behind basic auth on 127.0.0.1.

It can hold the push request (POST .../git-receive-pack) open until a test releases it, so a test can
watch the pushing processes while they are alive.
"""

from __future__ import annotations

import base64
import os
import subprocess
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

HOLD_TIMEOUT_SECONDS = 20.0


@dataclass
class Seen:
    """One request the server answered: method, path, whether its credentials were accepted."""

    method: str
    path: str
    authorised: bool


@dataclass
class GitHttpState:
    """What the handler threads share with the test."""

    project_root: Path
    username: str
    password: str
    home: Path
    requests: list[Seen] = field(default_factory=list)
    hold_receive_pack: bool = False
    receive_pack_arrived: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    released_in_time: bool | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def authorised(self, header: str | None) -> bool:
        expected = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return header == f"Basic {expected}"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: tests read `requests` instead."""

    def _serve(self, method: str) -> None:
        state = self.server.state
        path, _, query = self.path.partition("?")
        ok = state.authorised(self.headers.get("Authorization"))
        with state.lock:
            state.requests.append(Seen(method, path, ok))
        if not ok:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self._body()
        if method == "POST" and path.endswith("/git-receive-pack") and state.hold_receive_pack:
            state.receive_pack_arrived.set()
            state.released_in_time = state.release.wait(HOLD_TIMEOUT_SECONDS)
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "HOME": str(state.home),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_PROJECT_ROOT": str(state.project_root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "REQUEST_METHOD": method,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_USER": state.username,
            "REMOTE_ADDR": self.client_address[0],
            "SERVER_PROTOCOL": "HTTP/1.1",
        }
        for header, variable in (
            ("Git-Protocol", "GIT_PROTOCOL"),
            ("Content-Encoding", "HTTP_CONTENT_ENCODING"),
        ):
            if self.headers.get(header):
                env[variable] = self.headers[header]
        done = subprocess.run(
            ["git", "http-backend"], input=body, env=env, capture_output=True, timeout=60, check=False
        )
        head, payload = _split_cgi(done.stdout)
        status = 200
        headers: list[tuple[str, str]] = []
        for line in head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))


def _split_cgi(output: bytes) -> tuple[bytes, bytes]:
    """CGI output is headers, a blank line, then the body."""
    ends = [(output.find(sep), sep) for sep in (b"\r\n\r\n", b"\n\n") if sep in output]
    if not ends:
        return b"", output
    at, sep = min(ends)
    return output[:at], output[at + len(sep) :]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: GitHttpState


class GitHttpServer:
    """Serves every repository under `project_root` at http://127.0.0.1:PORT/<name>, basic auth only."""

    def __init__(self, project_root: Path, *, password: str, username: str = "x-access-token") -> None:
        home = project_root.parent / ".git-http-home"
        home.mkdir(parents=True, exist_ok=True)
        self.state = GitHttpState(project_root=project_root, username=username, password=password, home=home)
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.state = self.state
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def url(self, name: str) -> str:
        """The URL of repository `name` (a directory under project_root)."""
        return f"http://127.0.0.1:{self.port}/{name}"

    def __enter__(self) -> GitHttpServer:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.state.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
