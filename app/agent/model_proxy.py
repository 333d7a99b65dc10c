"""A local reverse proxy to the Anthropic API, so the real API key never reaches the agent's processes.

The service holds the key and runs this proxy on 127.0.0.1 inside its own event loop. Each agent phase
gets a random token from `issue()` as its ANTHROPIC_API_KEY and `base_url` as its ANTHROPIC_BASE_URL; the
proxy accepts only live tokens (`x-api-key` or `Authorization: Bearer`), swaps in the real key, forwards
what the CLI sends (POST /v1/messages and /v1/messages/count_tokens; never the files, batches or admin
paths the real key would open) to the upstream and streams the answer back chunk by chunk (SSE is never
buffered). `revoke()` ends a token when its phase ends. A sandbox without a network reaches the proxy
through a Unix socket that `listen(path)` opens for the length of one phase and the bridge inside turns
into a port. Code the agent runs can read the token from the CLI's
environment, but the token is worth nothing once the phase is over, and the key itself is never there.

The HTTP/1.1 server side is deliberately small: one request per connection (`Connection: close`), a
`Content-Length` body only (a chunked request body answers 411), bounded head and body sizes, and the
response body sent with chunked transfer encoding so a truncated upstream answer stays visible to the
client as a truncated response.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import unquote

import httpx

from app.logger import get_logger, register_secrets

log = get_logger(__name__)

HOST = "127.0.0.1"
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 32 * 1024 * 1024
CONNECT_TIMEOUT = 10.0
# No read timeout: a model answer may stream for minutes, and the agent's phase has its own wall clock.
UPSTREAM_TIMEOUT = httpx.Timeout(None, connect=CONNECT_TIMEOUT)
STOP_GRACE_SECONDS = 0.5
LINGER_SECONDS = 1.0
FORWARDED = frozenset({("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens")})
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "trailers", "upgrade"}
)
# Never forwarded upstream besides the hop-by-hop ones: replaced (credentials, Host, framing) or handled here.
_REQUEST_DROP = frozenset({"host", "content-length", "x-api-key", "authorization", "expect"})
_DIGITS = re.compile(r"[0-9]{1,12}")
_TOKEN_CHARS = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    411: "invalid_request_error",
    413: "request_too_large",
    417: "invalid_request_error",
    431: "invalid_request_error",
    502: "api_error",
    505: "invalid_request_error",
}


class _Reject(Exception):
    """A request the proxy answers itself with an Anthropic-style error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _ClientGone(Exception):
    """The client closed the connection before a whole request arrived."""


@dataclass(frozen=True)
class _Request:
    method: str
    target: str
    headers: Sequence[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers if key.lower() == name), None)


def error_body(status: int, message: str) -> bytes:
    """An Anthropic-style error document: `{"type": "error", "error": {"type": ..., "message": ...}}`."""
    kind = _ERROR_TYPES.get(status, "api_error")
    return json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _head(status: int, headers: Sequence[tuple[str, str]]) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers)
    # latin-1 round-trips any header bytes unchanged (values were decoded with it).
    return f"HTTP/1.1 {status} {reason}\r\n{lines}\r\n".encode("latin-1")


def _connection_tokens(headers: Sequence[tuple[str, str]]) -> set[str]:
    """Header names that the Connection header declares hop-by-hop."""
    named: set[str] = set()
    for key, value in headers:
        if key.lower() == "connection":
            named.update(part.strip().lower() for part in value.split(",") if part.strip())
    return named


def _end_to_end(headers: Sequence[tuple[str, str]], drop: frozenset[str]) -> list[tuple[str, str]]:
    """The headers without hop-by-hop ones (fixed, `Proxy-*`, and those Connection names) and `drop`."""
    named = _connection_tokens(headers)
    return [
        (key, value)
        for key, value in headers
        if (lower := key.lower()) not in HOP_BY_HOP
        and lower not in named
        and lower not in drop
        and not lower.startswith("proxy-")
    ]


async def _read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> _Request:
    """Read one request: request line, headers and a Content-Length body, within the size bounds."""
    try:
        raw_head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError as exc:
        raise _Reject(431, f"request head larger than {MAX_HEAD_BYTES} bytes") from exc
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise _ClientGone from exc
    request_line, *header_lines = raw_head[:-4].decode("latin-1").split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not _TOKEN_CHARS.fullmatch(parts[0]) or not parts[1].startswith("/"):
        raise _Reject(400, "malformed request line")
    method, target, version = parts
    if version != "HTTP/1.1":
        raise _Reject(505, "only HTTP/1.1 is supported")
    headers: list[tuple[str, str]] = []
    for line in header_lines:
        name, colon, value = line.partition(":")
        # No obs-fold, no space before the colon, no control characters: ambiguity is how smuggling starts.
        if not colon or not _TOKEN_CHARS.fullmatch(name) or any(c in value for c in "\0\r\n"):
            raise _Reject(400, "malformed header line")
        headers.append((name, value.strip(" \t")))
    names = {key.lower() for key, _ in headers}
    if "transfer-encoding" in names:
        raise _Reject(411, "a request body must be sent with Content-Length, not Transfer-Encoding")
    lengths = {value for key, value in headers if key.lower() == "content-length"}
    if len(lengths) > 1 or not all(_DIGITS.fullmatch(value) for value in lengths):
        raise _Reject(400, "invalid Content-Length")
    length = int(next(iter(lengths), "0"))
    if length > MAX_BODY_BYTES:
        raise _Reject(413, f"request body larger than {MAX_BODY_BYTES} bytes")
    expect = next((value for key, value in headers if key.lower() == "expect"), None)
    if expect is not None and length:
        if expect.lower() != "100-continue":
            raise _Reject(417, "unsupported Expect")
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
    try:
        body = await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise _ClientGone from exc
    return _Request(method, target, headers, body)


async def _until_eof(reader: asyncio.StreamReader) -> None:
    """Return when the client closes its side: the sign that nobody waits for the answer any more."""
    with contextlib.suppress(ConnectionError):
        while await reader.read(65536):
            pass


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """After an early refusal, read what the client still sends for a moment before closing.

    Closing a socket with unread input sends a reset, which can destroy the refusal before the client
    has read it.
    """
    with contextlib.suppress(Exception):
        writer.write_eof()
        async with asyncio.timeout(LINGER_SECONDS):
            await _until_eof(reader)


class _Abort(Exception):
    """The response cannot be completed; the connection is cut so the client sees it truncated."""


def _clear_socket(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.unlink(missing_ok=True)


class ModelProxy:
    """The reverse proxy: per-phase tokens in, the real key out, answers streamed back as they arrive.

    `async with ModelProxy(upstream, key) as proxy:` listens on 127.0.0.1 on a free port in the running
    event loop (no thread, no signal handlers). Without `client`, the proxy makes and closes its own
    httpx client (it honours HTTPS_PROXY and SSL_CERT_FILE like any httpx client).
    """

    def __init__(self, upstream: str, api_key: str, *, client: httpx.AsyncClient | None = None) -> None:
        url = httpx.URL(upstream)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("the upstream must be an http(s) URL")
        if not api_key:
            raise ValueError("the proxy needs an API key to put in the upstream requests")
        register_secrets([api_key])
        self._upstream = upstream.rstrip("/")
        self._upstream_host = url.host
        self._api_key = api_key
        self._client = client
        self._owns_client = client is None
        self._live: set[bytes] = set()
        self._server: asyncio.Server | None = None
        self._port = 0
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

    # --- tokens ---------------------------------------------------------------------------------------

    def issue(self) -> str:
        """A new random token, accepted until `revoke`d; give it to one agent phase as ANTHROPIC_API_KEY."""
        token = secrets.token_urlsafe(32)
        self._live.add(_digest(token))
        return token

    def revoke(self, token: str) -> None:
        """Stop accepting `token` (unknown or already revoked tokens are ignored)."""
        self._live.discard(_digest(token))

    def _authorized(self, request: _Request) -> bool:
        # The set holds SHA-256 digests, so a lookup reveals nothing about how close a guess was.
        token = request.header("x-api-key")
        if token is None:
            scheme, _, credentials = (request.header("authorization") or "").partition(" ")
            token = credentials.strip() if scheme.lower() == "bearer" else None
        return bool(token) and _digest(token or "") in self._live

    # --- life cycle -----------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:PORT`, the value for the agent's ANTHROPIC_BASE_URL."""
        if self._server is None:
            raise RuntimeError("the model proxy is not running")
        return f"http://{HOST}:{self._port}"

    async def start(self) -> None:
        """Listen on 127.0.0.1 on a free port, served by the running event loop."""
        if self._server is not None:
            raise RuntimeError("the model proxy is already running")
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=UPSTREAM_TIMEOUT, limits=httpx.Limits(max_connections=None)
            )
        self._server = await asyncio.start_server(self._serve, HOST, 0, limit=MAX_HEAD_BYTES)
        self._port = self._server.sockets[0].getsockname()[1]
        log.info("model proxy started", base_url=self.base_url, upstream_host=self._upstream_host)

    async def stop(self) -> None:
        """Close the listener, cut every open connection (and so its upstream request), close the client."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task, writer in list(self._connections.items()):
            writer.transport.abort()
            task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=STOP_GRACE_SECONDS)
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), STOP_GRACE_SECONDS)
        log.info("model proxy stopped", live_tokens=len(self._live))

    @contextlib.asynccontextmanager
    async def listen(self, path: Path) -> AsyncIterator[Path]:
        """Serve also on the Unix socket `path` (mode 0600) for the block: one sandboxed phase's bridge."""
        if self._server is None:
            raise RuntimeError("the model proxy is not running")
        _clear_socket(path)
        server = await asyncio.start_unix_server(self._serve, path, limit=MAX_HEAD_BYTES)
        os.chmod(path, 0o600)
        try:
            yield path
        finally:
            server.close()
            _clear_socket(path)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # --- serving --------------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        completed = False
        try:
            try:
                request = await _read_request(reader, writer)
            except _Reject as reject:
                await self._send_error(writer, reject.status, reject.message)
                await _linger(reader, writer)
                return
            try:
                await self._answer(request, reader, writer)
            except _Reject as reject:
                await self._send_error(writer, reject.status, reject.message)
            completed = True
        except (_ClientGone, _Abort, ConnectionError):
            pass
        except Exception:
            log.exception("model proxy request failed")
        finally:
            self._connections.pop(task, None)
            if completed:
                # close() flushes what is still buffered; a client that stopped reading is cut off.
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), STOP_GRACE_SECONDS)
            writer.transport.abort()

    async def _answer(
        self, request: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        path = request.target.partition("?")[0]
        if (request.method, unquote(path)) not in FORWARDED or path != unquote(path):
            log.warning("model proxy refused a path", method=request.method, path=path[:200])
            raise _Reject(404, "the model proxy forwards POST /v1/messages and its count_tokens only")
        if not self._authorized(request):
            log.warning("model proxy refused a token", method=request.method, path=path)
            raise _Reject(401, "invalid or expired agent token")
        started = time.monotonic()
        forward = asyncio.create_task(self._forward(request, writer))
        gone = asyncio.create_task(_until_eof(reader))
        try:
            await asyncio.wait({forward, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (forward, gone):
                task.cancel()
            await asyncio.gather(forward, gone, return_exceptions=True)
        failure = None if forward.cancelled() else forward.exception()
        if failure is not None:
            raise failure
        if forward.cancelled():
            log.info("model proxy client went away", path=path, seconds=round(time.monotonic() - started, 2))
            raise _Abort
        log.debug(
            "model proxy forwarded",
            method=request.method,
            path=path,
            status=forward.result(),
            seconds=round(time.monotonic() - started, 2),
        )

    async def _forward(self, request: _Request, writer: asyncio.StreamWriter) -> int:
        """Send the request upstream with the real key and stream the answer back; returns the status."""
        assert self._client is not None
        headers = _end_to_end(request.headers, _REQUEST_DROP)
        if not any(key.lower() == "accept-encoding" for key, _ in headers):
            # Otherwise httpx adds its default and the client would get an encoding it never asked for.
            headers.append(("accept-encoding", "identity"))
        headers.append(("x-api-key", self._api_key))
        upstream_request = self._client.build_request(
            request.method,
            self._upstream + request.target,
            # Bytes, so any header value passes through exactly as received.
            headers=[(key.encode("latin-1"), value.encode("latin-1")) for key, value in headers],
            content=request.body,
            timeout=UPSTREAM_TIMEOUT,
        )
        try:
            response = await self._client.send(upstream_request, stream=True)
        except httpx.HTTPError as exc:
            reason = "timed out" if isinstance(exc, httpx.TimeoutException) else "failed"
            log.warning("model proxy upstream failed", error=type(exc).__name__, reason=reason)
            await self._send_error(
                writer, 502, f"the model API could not be reached: {reason} ({type(exc).__name__})"
            )
            return 502
        try:
            await self._relay(request.method, response, writer)
        finally:
            await response.aclose()
        return response.status_code

    async def _relay(self, method: str, response: httpx.Response, writer: asyncio.StreamWriter) -> None:
        """Write the upstream's status, headers and raw body chunks (still content-encoded) as they come."""
        status = response.status_code
        bodyless = method == "HEAD" or status in (204, 304) or status < 200
        received = [(key.decode("latin-1"), value.decode("latin-1")) for key, value in response.headers.raw]
        headers = _end_to_end(received, frozenset({"content-length"}))
        if bodyless:
            headers += [(key, value) for key, value in received if key.lower() == "content-length"]
        else:
            headers.append(("transfer-encoding", "chunked"))
        headers.append(("connection", "close"))
        writer.write(_head(status, headers))
        await writer.drain()
        if bodyless:
            return
        try:
            async for chunk in response.aiter_raw():
                if chunk:  # an empty chunk would end the chunked body
                    writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    await writer.drain()
        except httpx.HTTPError as exc:
            log.warning("model proxy upstream stream broke", error=type(exc).__name__)
            raise _Abort from exc
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def _send_error(self, writer: asyncio.StreamWriter, status: int, message: str) -> None:
        body = error_body(status, message.replace(self._api_key, "[redacted]"))
        headers = [
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
            ("connection", "close"),
        ]
        writer.write(_head(status, headers) + body)
        await writer.drain()
