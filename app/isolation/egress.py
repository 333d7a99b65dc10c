"""An allowlisting egress proxy for sandboxed processes that have no network of their own.

Each sandboxed phase gets a `Channel`: a Unix socket, bind-mounted into its sandbox, that its HTTP_PROXY and
HTTPS_PROXY lead to. Every request is decided in one order, recorded and logged with the rule that decided
it: the port must be in the phase's `allow_ports`; the host, lower-cased and without a trailing dot, must be
exactly in its `allow_hosts` (no wildcards, no suffixes); the proxy then resolves the name itself and
refuses it if any address is not global unicast (loopback, private, link-local and cloud metadata, CGNAT,
multicast, reserved, or IPv4 embedded in IPv6 as one of those) outside the operator's `trusted_nets`; and
it connects to the very address it checked, so a second DNS answer cannot swap in another. `https://` goes
through CONNECT tunnels; plain HTTP is forwarded one request per connection, its body framed by
Content-Length, with the Host header set from the target. A `Scanner` looks for decoy secrets (canaries)
in request heads and plain-HTTP request bodies, and a hit cuts the connection before those bytes leave.

What it trusts: the resolver, and the allowed hosts themselves. A tunnel carries TLS the proxy cannot
read, so it cannot see what is sent to an allowed host, nor stop domain fronting (the TLS name of an
allowed host, the HTTP Host of another site on the same CDN): allow only hosts you would let see the data.
A channel given an `Interception` (app/isolation/tls.py) reads it: it ends the client's TLS with a
certificate of the run's own authority, opens its own to the host, and scans the plaintext too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import socket
import ssl
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from http import HTTPStatus
from pathlib import Path
from typing import Any

from app.isolation.tls import Interception
from app.logger import get_logger

log = get_logger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Scanner = Callable[[str], list[str]]
Resolver = Callable[[str, int], Awaitable[list[str]]]

MAX_HEAD_BYTES = 64 * 1024
CHUNK_BYTES = 64 * 1024
SCAN_OVERLAP = 256
STOP_GRACE_SECONDS = 0.5
LINGER_SECONDS = 1.0
ALLOWLIST_RULE = "allowlist"
UNREACHABLE_RULE = "upstream unreachable"
CLIENT_TLS_RULE = "client refused the interception certificate"
UPSTREAM_TLS_RULE = "upstream TLS failed"
_TOKEN_CHARS = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET_CHARS = re.compile(r"[\x21-\x7e]+")
_DIGITS = re.compile(r"[0-9]{1,12}")
_AUTHORITY = re.compile(r"(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9_.-]+))(?::([0-9]{1,5}))?")
_HTTP_TARGET = re.compile(r"http://([^/?#]*)([^#]*)", re.IGNORECASE)
# Replaced (Host, Connection) or hop-by-hop; every Proxy-* header is dropped as well.
_REQUEST_DROP = frozenset({"host", "connection", "keep-alive", "te", "trailer", "upgrade"})
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


@dataclass(frozen=True)
class EgressPolicy:
    """What one phase may reach."""

    allow_hosts: frozenset[str] = frozenset()
    allow_ports: frozenset[int] = frozenset({80, 443})
    trusted_nets: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class Connection:
    """One request that reached the proxy, as recorded on the run (`allowed`: the policy let it through)."""

    phase: str
    method: str
    host: str
    port: int
    allowed: bool
    rule: str
    bytes_up: int = 0
    bytes_down: int = 0
    started_at: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Connection:
        """The record `to_dict` made (unknown keys are ignored)."""
        names = {item.name for item in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


class _Reject(Exception):
    """A request the proxy answers itself with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _ClientGone(Exception):
    """The client closed (or went quiet) before a whole request head arrived."""


class _Tripped(Exception):
    """A decoy secret was about to leave; the connection is cut."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


@dataclass(frozen=True)
class _Request:
    method: str
    host: str
    port: int
    path: str  # origin-form; empty for CONNECT
    version: str
    headers: Sequence[tuple[str, str]]
    length: int
    head: str  # as received, decoded as latin-1


@dataclass
class _Link:
    """One client connection: its writers (to cut it), its record and its byte counts."""

    client: asyncio.StreamWriter
    started_at: float = field(default_factory=time.time)
    began: float = field(default_factory=time.monotonic)
    last_active: float = field(default_factory=time.monotonic)
    upstream: asyncio.StreamWriter | None = None
    request: _Request | None = None
    index: int | None = None
    up: int = 0
    down: int = 0

    def cut(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.transport.abort()


class _Tail:
    """Feeds a scanner chunk by chunk, rescanning the last bytes so a value split across reads is found."""

    def __init__(self, scan: Scanner) -> None:
        self._scan = scan
        self._tail = ""

    def check(self, data: str | bytes) -> None:
        text = self._tail + (data if isinstance(data, str) else data.decode("latin-1"))
        found = self._scan(text)
        if found:
            raise _Tripped(found[0])
        self._tail = text[-SCAN_OVERLAP:]


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _normal_host(host: str) -> str:
    """Lower-cased, without a trailing dot or IPv6 brackets; IP literals in their canonical form."""
    host = host.lower().removesuffix(".").removeprefix("[").removesuffix("]")
    address = _ip(host)
    return host if address is None else str(address)


def _authority(host: str, port: int | None) -> str:
    """`host:port` (IPv6 in brackets), or the host alone when port is None."""
    bracketed = f"[{host}]" if ":" in host else host
    return bracketed if port is None else f"{bracketed}:{port}"


def _is_public(address: IPAddress) -> bool:
    """Global unicast only: never loopback, private, link-local, CGNAT, multicast, reserved or unspecified."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return _is_public(embedded)
        if address.is_site_local:
            return False
    return address.is_global and not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


def _address_denial(host: str, addresses: Sequence[str], trusted: Sequence[IPNetwork]) -> str | None:
    """The rule that refuses these addresses, or None when every one is public or trusted."""
    verb = "resolves to" if _ip(host) is None else "is"
    for text in addresses:
        address = _ip(text)
        if address is None:
            return f"{verb} an unparsable address {text[:64]}"
        mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
        forms = [address] if mapped is None else [address, mapped]
        if not _is_public(address) and not any(form in net for form in forms for net in trusted):
            return f"{verb} a private address {address}"
    return None


async def _getaddrinfo(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _split_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    match = _AUTHORITY.fullmatch(authority)
    port = int(match[3]) if match is not None and match[3] is not None else default_port
    if match is None or port is None or not 0 < port < 65536:
        raise _Reject(400, "malformed host:port")
    if match[1] is not None:
        try:
            return str(ipaddress.IPv6Address(match[1])), port
        except ValueError as exc:
            raise _Reject(400, "malformed IPv6 address") from exc
    host = _normal_host(match[2])
    if not host:
        raise _Reject(400, "malformed host:port")
    return host, port


async def _read_head(reader: asyncio.StreamReader, timeout: float) -> str:
    try:
        async with asyncio.timeout(timeout):
            raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError as exc:
        raise _Reject(431, f"request head larger than {MAX_HEAD_BYTES} bytes") from exc
    except (asyncio.IncompleteReadError, ConnectionError, TimeoutError) as exc:
        raise _ClientGone from exc
    return raw.decode("latin-1")


def _parse(head: str) -> _Request:
    """A CONNECT or absolute-form http:// request head, parsed strictly: ambiguity is how smuggling starts."""
    request_line, *header_lines = head[:-4].split("\r\n")
    parts = request_line.split(" ")
    if (
        len(parts) != 3
        or not _TOKEN_CHARS.fullmatch(parts[0])
        or not _TARGET_CHARS.fullmatch(parts[1])
        or parts[2] not in ("HTTP/1.1", "HTTP/1.0")
    ):
        raise _Reject(400, "malformed request line")
    method, target, version = parts
    headers: list[tuple[str, str]] = []
    for line in header_lines:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN_CHARS.fullmatch(name) or any(c in value for c in "\0\r\n"):
            raise _Reject(400, "malformed header line")
        headers.append((name, value.strip(" \t")))
    if method == "CONNECT":
        host, port = _split_authority(target, None)
        return _Request(method, host, port, "", version, headers, 0, head)
    match = _HTTP_TARGET.fullmatch(target)
    if match is None:
        if target.lower().startswith("https://"):
            raise _Reject(400, "https:// targets go through a CONNECT tunnel")
        raise _Reject(400, "a proxy request needs an absolute http:// target")
    host, port = _split_authority(match[1], 80)
    path = match[2] if match[2].startswith("/") else "/" + match[2]
    if any(key.lower() == "transfer-encoding" for key, _ in headers):
        raise _Reject(411, "a request body must be sent with Content-Length, not Transfer-Encoding")
    lengths = {value for key, value in headers if key.lower() == "content-length"}
    if len(lengths) > 1 or not all(_DIGITS.fullmatch(value) for value in lengths):
        raise _Reject(400, "invalid Content-Length")
    return _Request(method, host, port, path, version, headers, int(next(iter(lengths), "0")), head)


def _origin_head(request: _Request) -> bytes:
    """The request head for the origin: origin-form target, Host from the target, `Connection: close`."""
    kept = [
        f"{key}: {value}"
        for key, value in request.headers
        if (lower := key.lower()) not in _REQUEST_DROP and not lower.startswith("proxy-")
    ]
    host = _authority(request.host, None if request.port == 80 else request.port)
    lines = [
        f"{request.method} {request.path} {request.version}",
        f"Host: {host}",
        *kept,
        "Connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int, body: str) -> None:
    """Answer with a plain-text error, then read what the client still sends for a moment before closing.

    Closing a socket with unread input sends a reset, which can destroy the answer before it is read.
    """
    payload = body.encode()
    headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(payload))), ("Connection", "close")]
    if status == 403:
        headers.append(("X-Auto-Code-Egress", "denied"))
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers)
    writer.write(f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n{lines}\r\n".encode() + payload)
    await writer.drain()
    with contextlib.suppress(Exception):
        writer.write_eof()
        async with asyncio.timeout(LINGER_SECONDS):
            while await reader.read(CHUNK_BYTES):
                pass


async def _pump(
    link: _Link,
    source: asyncio.StreamReader,
    sink: asyncio.StreamWriter,
    *,
    upward: bool,
    limit: int | None = None,
    tail: _Tail | None = None,
) -> None:
    """Copy source to sink until EOF, passed on, or `limit` bytes; a chunk holding a canary is never sent."""
    with contextlib.suppress(ConnectionError):
        while limit is None or limit > 0:
            chunk = await source.read(CHUNK_BYTES if limit is None else min(CHUNK_BYTES, limit))
            if not chunk:
                if sink.can_write_eof():
                    sink.write_eof()
                return
            if tail is not None:
                tail.check(chunk)
            sink.write(chunk)
            link.last_active = time.monotonic()
            if upward:
                link.up += len(chunk)
            else:
                link.down += len(chunk)
            if limit is not None:
                limit -= len(chunk)
            await sink.drain()


def _tls_error(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not trusted ({exc.verify_message})"
    return getattr(exc, "reason", None) or type(exc).__name__


def _remove_socket(path: Path) -> None:
    """Remove the socket file at path (a stale one, or ours); anything else there stays, and bind fails."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()


async def _close(writer: asyncio.StreamWriter) -> None:
    """Flush what is buffered and close; a peer that stopped reading is cut off after a moment."""
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), STOP_GRACE_SECONDS)
    writer.transport.abort()


class Channel:
    """One listener for one sandboxed phase: its socket, its policy, what it recorded."""

    def __init__(
        self,
        socket_path: Path,
        phase: str,
        policy: EgressPolicy,
        scan: Scanner | None,
        tls: Interception | None = None,
    ) -> None:
        self.phase = phase
        self.socket_path = socket_path
        self.policy = policy
        self.scan = scan
        self.tls = tls
        self.records: list[Connection] = []
        self._hosts = frozenset(_normal_host(host) for host in policy.allow_hosts)
        self._tripped: list[str] = []
        self._links: dict[asyncio.Task[Any], _Link] = {}

    @property
    def tripped(self) -> list[str]:
        """The canary names seen on this channel, each once, in the order first seen (empty: none)."""
        return list(dict.fromkeys(self._tripped))

    def denied(self) -> list[Connection]:
        """The records of requests the policy refused."""
        return [record for record in self.records if not record.allowed]

    def _denial(self, host: str, port: int) -> str | None:
        if port not in self.policy.allow_ports:
            return f"port {port} not allowed"
        if host not in self._hosts:
            return f"not in the allowlist of {self.phase}"
        return None

    def _record(self, link: _Link, *, allowed: bool, rule: str, **detail: Any) -> None:
        request = link.request
        method, host, port = (request.method, request.host, request.port) if request else ("", "", 0)
        link.index = len(self.records)
        self.records.append(
            Connection(self.phase, method, host, port, allowed, rule, started_at=link.started_at)
        )
        context = {"phase": self.phase, "method": method, "host": host, "port": port, "rule": rule, **detail}
        if allowed:
            log.info("egress allowed", **context)
        else:
            log.warning("egress denied", **context)

    def _amend(self, link: _Link, **changes: Any) -> None:
        if link.index is not None:
            self.records[link.index] = replace(self.records[link.index], **changes)

    def _trip(self, link: _Link, name: str) -> None:
        rule = f"canary: {name}"
        self._tripped.append(name)
        if link.index is None:
            self._record(link, allowed=False, rule=rule)
        else:
            self._amend(link, allowed=False, rule=rule)
        request = link.request
        log.error(
            "egress canary tripped",
            phase=self.phase,
            host=request.host if request else "",
            port=request.port if request else 0,
            canary=name,
        )

    async def _cut(self) -> None:
        for task, link in list(self._links.items()):
            link.cut()
            task.cancel()
        if self._links:
            await asyncio.wait(list(self._links), timeout=STOP_GRACE_SECONDS)


class EgressProxy:
    """The proxy: `async with proxy.channel(path, phase, policy)` serves one phase on its own Unix socket.

    Channels are served by the running event loop (no thread); `resolve` replaces the system resolver
    (host, port -> addresses) and is asked once per request, for listed names only.
    """

    def __init__(
        self, *, resolve: Resolver | None = None, connect_timeout: float = 10.0, idle_timeout: float = 300.0
    ) -> None:
        self._resolve = resolve or _getaddrinfo
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout

    @contextlib.asynccontextmanager
    async def channel(
        self,
        socket_path: Path,
        phase: str,
        policy: EgressPolicy,
        scan: Scanner | None = None,
        tls: Interception | None = None,
    ) -> AsyncIterator[Channel]:
        """Listen on socket_path (mode 0600) for the block; on exit close it and cut its connections."""
        channel = Channel(socket_path, phase, policy, scan, tls)

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve(channel, reader, writer)

        socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _remove_socket(socket_path)
        server = await asyncio.start_unix_server(serve, socket_path, limit=MAX_HEAD_BYTES)
        os.chmod(socket_path, 0o600)
        log.info("egress channel opened", phase=phase, socket=str(socket_path), hosts=sorted(channel._hosts))
        try:
            yield channel
        finally:
            server.close()
            await channel._cut()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), STOP_GRACE_SECONDS)
            _remove_socket(socket_path)
            log.info(
                "egress channel closed",
                phase=phase,
                connections=len(channel.records),
                denied=len(channel.denied()),
                tripped=channel.tripped,
            )

    async def _serve(
        self, channel: Channel, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        link = _Link(writer)
        channel._links[task] = link
        try:
            await self._handle(channel, link, reader)
        except _Tripped as trip:
            channel._trip(link, trip.name)
            link.cut()
        except (_ClientGone, ConnectionError):
            pass
        except Exception:
            log.exception("egress connection failed", phase=channel.phase)
            link.cut()
        finally:
            channel._links.pop(task, None)
            channel._amend(
                link, bytes_up=link.up, bytes_down=link.down, seconds=round(time.monotonic() - link.began, 3)
            )
            if link.upstream is not None:
                await _close(link.upstream)
            await _close(writer)

    async def _handle(self, channel: Channel, link: _Link, reader: asyncio.StreamReader) -> None:
        try:
            link.request = request = _parse(await _read_head(reader, self._idle_timeout))
        except _Reject as reject:
            channel._record(
                link, allowed=False, rule="bad request", status=reject.status, reason=reject.message
            )
            await _refuse(reader, link.client, reject.status, f"auto-code egress proxy: {reject.message}\n")
            return
        tail = _Tail(channel.scan) if channel.scan is not None else None
        if tail is not None:
            tail.check(request.head)
        host, port = request.host, request.port
        denial = channel._denial(host, port)
        addresses: list[str] = []
        if denial is None:
            addresses = [host] if _ip(host) is not None else await self._lookup(channel, host, port)
            denial = _address_denial(host, addresses, channel.policy.trusted_nets)
        if denial is not None:
            channel._record(link, allowed=False, rule=denial)
            body = (
                f"auto-code egress proxy: {_authority(host, port)} denied ({denial}) for the {channel.phase}"
                f" phase. Ask the operator to add the host to EGRESS_ALLOW_{channel.phase.upper()}"
                " if this phase needs it.\n"
            )
            await _refuse(reader, link.client, 403, body)
            return
        channel._record(link, allowed=True, rule=ALLOWLIST_RULE, addresses=addresses)
        opened = await self._open(channel, addresses, port)
        if opened is None:
            channel._amend(link, rule=UNREACHABLE_RULE)
            message = f"auto-code egress proxy: {_authority(host, port)} could not be reached\n"
            await _refuse(reader, link.client, 502, message)
            return
        upstream_reader, link.upstream = opened
        if request.method == "CONNECT":
            link.client.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await link.client.drain()
            if channel.tls is not None:
                if not await self._intercept(channel, link, host):
                    return
                tail = _Tail(channel.scan) if channel.scan is not None else None
            await self._relay(channel, link, reader, upstream_reader, tail=tail if channel.tls else None)
            return
        head = _origin_head(request)
        link.upstream.write(head)
        link.up += len(head)
        await self._relay(channel, link, reader, upstream_reader, limit=request.length, tail=tail)

    async def _intercept(self, channel: Channel, link: _Link, host: str) -> bool:
        """End the client's TLS with the run's certificate for `host` and open the proxy's own upstream."""
        assert channel.tls is not None and link.upstream is not None
        try:
            async with asyncio.timeout(self._connect_timeout):
                await link.client.start_tls(channel.tls.server_context(host))
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            channel._amend(link, rule=CLIENT_TLS_RULE)
            log.warning("egress client TLS failed", phase=channel.phase, host=host, error=_tls_error(exc))
            return False
        try:
            async with asyncio.timeout(self._connect_timeout):
                await link.upstream.start_tls(channel.tls.upstream, server_hostname=host)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            channel._amend(link, rule=f"{UPSTREAM_TLS_RULE}: {_tls_error(exc)}")
            log.warning("egress upstream TLS failed", phase=channel.phase, host=host, error=_tls_error(exc))
            return False
        return True

    async def _lookup(self, channel: Channel, host: str, port: int) -> list[str]:
        """The addresses of a listed name, each once; none when it does not resolve in time."""
        try:
            async with asyncio.timeout(self._connect_timeout):
                return list(dict.fromkeys(await self._resolve(host, port)))
        except (OSError, TimeoutError) as exc:
            log.warning(
                "egress name did not resolve", phase=channel.phase, host=host, error=type(exc).__name__
            )
            return []

    async def _open(
        self, channel: Channel, addresses: Sequence[str], port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """Connect to the first of the checked addresses that answers (a literal IP: nothing is resolved)."""
        for address in addresses:
            try:
                async with asyncio.timeout(self._connect_timeout):
                    return await asyncio.open_connection(address, port)
            except (OSError, TimeoutError) as exc:
                log.warning(
                    "egress upstream unreachable",
                    phase=channel.phase,
                    address=address,
                    port=port,
                    error=type(exc).__name__,
                )
        return None

    async def _relay(
        self,
        channel: Channel,
        link: _Link,
        reader: asyncio.StreamReader,
        upstream_reader: asyncio.StreamReader,
        *,
        limit: int | None = None,
        tail: _Tail | None = None,
    ) -> None:
        """Run both directions until the upstream closes, or nothing moved for idle_timeout."""
        assert link.upstream is not None
        up = asyncio.ensure_future(_pump(link, reader, link.upstream, upward=True, limit=limit, tail=tail))
        down = asyncio.ensure_future(_pump(link, upstream_reader, link.client, upward=False))
        pending: set[asyncio.Future[None]] = {up, down}
        try:
            while True:
                idle_left = self._idle_timeout - (time.monotonic() - link.last_active)
                if idle_left <= 0:
                    log.info("egress connection idle", phase=channel.phase, seconds=self._idle_timeout)
                    return
                done, pending = await asyncio.wait(
                    pending, timeout=idle_left, return_when=asyncio.FIRST_COMPLETED
                )
                for finished in done:
                    finished.result()  # a tripped canary surfaces here
                if down in done:
                    return
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
