"""Helpers for tests of the fence: bubblewrap required under CI, a fence over temp dirs, host listeners."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import os
import socket
import socketserver
import ssl
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from app.isolation import sandbox
from app.isolation.egress import EgressPolicy, EgressProxy
from app.isolation.fence import Fence, FenceConfig, ModelListener


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need_bwrap() -> None:
    """Skip where bubblewrap cannot make namespaces; under CI=true that is a failure, not a skip."""
    problem = sandbox.probe()
    if problem is None:
        return
    if in_ci():
        pytest.fail(f"process isolation is required under CI: {problem}")
    pytest.skip(f"process isolation unavailable here: {problem}")


def resolver(names: Mapping[str, Sequence[str]]) -> Any:
    """A resolver that answers from `names` only (a test never asks the real DNS)."""

    async def resolve(host: str, port: int) -> list[str]:
        if host not in names:
            raise OSError(f"{host} does not resolve")
        return list(names[host])

    return resolve


def make_fence(
    root: Path,
    *,
    policies: Mapping[str, EgressPolicy] | None = None,
    names: Mapping[str, Sequence[str]] | None = None,
    model: ModelListener | None = None,
    fenced: bool = True,
    intercept_tls: bool = False,
) -> Fence:
    """A fence over `root`/workspace, its bridges in a short temp dir (socket paths stay under 108 bytes)."""
    workspace = root / "workspace"
    workspace.mkdir(parents=True, exist_ok=True)
    isolation = None
    if fenced:
        need_bwrap()
        isolation = sandbox.Sandbox(bwrap="bwrap", workspace_dir=workspace, user_home=Path.home())
    bridges = Path(os.environ.get("TMPDIR", "/tmp")) / f"ac-{os.urandom(4).hex()}"
    config = FenceConfig(
        bridge_dir=bridges,
        cache_dir=workspace / ".auto-code" / "cache",
        key=b"k" * 32,
        policies=policies or {},
        intercept_tls=intercept_tls,
    )
    return Fence(isolation, config, egress=EgressProxy(resolve=resolver(names or {})), model=model)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.server.requests.append(("GET", self.path, b""))  # type: ignore[attr-defined]
        body = b"registry index\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append(("POST", self.path, data))  # type: ignore[attr-defined]
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class HttpServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """A plain HTTP server on 127.0.0.1 standing in for a package registry; records what it was sent."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, str, bytes]] = []

    @property
    def port(self) -> int:
        return int(self.server_address[1])


@contextlib.contextmanager
def http_server(tls: ssl.SSLContext | None = None) -> Iterator[HttpServer]:
    """The stand-in registry, over HTTPS when given a server context."""
    server = HttpServer()
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def tcp_listener() -> Iterator[tuple[int, list[str]]]:
    """A TCP listener on a free 127.0.0.1 port outside any sandbox; the list gets a line per connection."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[str] = []

    def accept() -> None:
        while True:
            try:
                conn, peer = listener.accept()
            except OSError:
                return
            accepted.append(f"{peer[0]}:{peer[1]}")
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1], accepted
    finally:
        listener.close()


class TcpRelay:
    """A model listener for tests: relays a phase's model socket to a TCP server (the scripted model)."""

    def __init__(self, port: int) -> None:
        self.port = port

    @contextlib.asynccontextmanager
    async def listen(self, path: Path) -> AsyncIterator[Path]:
        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            with contextlib.suppress(OSError):
                writer.write_eof()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
            up_writer.close()
            writer.close()

        server = await asyncio.start_unix_server(handle, str(path))
        try:
            yield path
        finally:
            server.close()
