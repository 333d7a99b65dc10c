"""TLS interception (EGRESS_TLS_INTERCEPT): the proxy reads inside HTTPS to an allowed host.

A real TLS client talks through the proxy's Unix socket to a real HTTPS origin on 127.0.0.1 (its
certificate from a test authority the proxy's upstream context trusts); the client trusts only the run's
authority, as a sandboxed process does through SSL_CERT_FILE.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from app.isolation.canary import Canaries
from app.isolation.egress import (
    CLIENT_TLS_RULE,
    UPSTREAM_TLS_RULE,
    Connection,
    EgressPolicy,
    EgressProxy,
)
from app.isolation.tls import Interception
from tests.test_egress import ESTABLISHED, LOOPBACK, RESPONSE, FakeResolver, Origin, _read_all, _run, sock

__all__ = ["sock"]  # the fixture, shared with test_egress

HOST = "registry.test"


@pytest.fixture
def origin_ca() -> Iterator[trustme.CA]:
    yield trustme.CA()


def _origin_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST).configure_cert(context)
    return context


def _upstream_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def _client_context(authority: Interception, tmp: Path) -> ssl.SSLContext:
    """What a sandboxed client trusts: SSL_CERT_FILE is the run's authority, nothing else."""
    path = authority.write(tmp)
    return ssl.create_default_context(cafile=str(path))


async def _https(sock: Path, port: int, client: ssl.SSLContext, request: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(sock)
    writer.write(f"CONNECT {HOST}:{port} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode())
    await writer.drain()
    assert await reader.readuntil(b"\r\n\r\n") == ESTABLISHED
    try:
        await writer.start_tls(client, server_hostname=HOST)
    except (ssl.SSLError, ConnectionError) as exc:
        writer.close()
        return f"handshake failed: {type(exc).__name__}".encode()
    writer.write(request)
    await writer.drain()
    answer = await _read_all(reader)
    writer.close()
    return answer


def _policy(port: int) -> EgressPolicy:
    return EgressPolicy(frozenset({HOST}), frozenset({port}), LOOPBACK)


def test_intercepted_https_is_relayed_and_a_decoy_inside_it_never_leaves(
    sock: Path, tmp_path: Path, origin_ca: trustme.CA
) -> None:
    canaries = Canaries.from_seed("tls-test")
    secret = canaries.value("aws secret access key")
    authority = Interception("run-1", upstream=_upstream_context(origin_ca))
    client = _client_context(authority, tmp_path)
    fine = f"GET /simple/ HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
    leak = f"POST /upload HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 40\r\n\r\n{secret}".encode()

    async def scenario() -> tuple[bytes, bytes, list[Connection], list[str], list[bytearray]]:
        origin = Origin()
        async with origin.running(_origin_context(origin_ca)):
            proxy = EgressProxy(resolve=FakeResolver({HOST: ["127.0.0.1"]}))
            async with proxy.channel(
                sock, "checks", _policy(origin.port), canaries.find, authority
            ) as channel:
                answered = await _https(sock, origin.port, client, fine)
                cut = await _https(sock, origin.port, client, leak)
            await asyncio.sleep(0.1)
        return answered, cut, channel.records, channel.tripped, origin.received

    answered, cut, records, tripped, received = _run(scenario)
    assert answered == RESPONSE, "an allowed HTTPS request goes through, read and re-encrypted"
    assert RESPONSE not in cut
    assert tripped == ["aws secret access key"]
    assert [(r.method, r.host, r.allowed, r.rule) for r in records] == [
        ("CONNECT", HOST, True, "allowlist"), ("CONNECT", HOST, False, "canary: aws secret access key"),
    ]  # fmt: skip
    assert received[0].startswith(b"GET /simple/ HTTP/1.1\r\n"), "the origin saw plaintext over its own TLS"
    assert all(secret.encode() not in data for data in received)
    assert records[0].bytes_up > 0 and records[0].bytes_down >= len(RESPONSE)


def test_without_interception_the_same_decoy_goes_through_unseen(
    sock: Path, tmp_path: Path, origin_ca: trustme.CA
) -> None:
    """The control: a plain tunnel cannot read HTTPS, so only interception can catch this."""
    canaries = Canaries.from_seed("tls-test")
    secret = canaries.value("aws secret access key")
    leak = f"POST /upload HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 40\r\n\r\n{secret}".encode()
    client = _upstream_context(origin_ca)  # the client trusts the origin itself: no one in between

    async def scenario() -> tuple[bytes, list[str], list[bytearray]]:
        origin = Origin()
        async with origin.running(_origin_context(origin_ca)):
            proxy = EgressProxy(resolve=FakeResolver({HOST: ["127.0.0.1"]}))
            async with proxy.channel(sock, "checks", _policy(origin.port), canaries.find) as channel:
                answer = await _https(sock, origin.port, client, leak)
            await asyncio.sleep(0.1)
        return answer, channel.tripped, origin.received

    answer, tripped, received = _run(scenario)
    assert answer == RESPONSE and tripped == []
    assert secret.encode() in received[0]


def test_a_client_that_does_not_trust_the_run_authority_fails_and_the_record_says_why(
    sock: Path, origin_ca: trustme.CA
) -> None:
    authority = Interception("run-1", upstream=_upstream_context(origin_ca))
    pinned = _upstream_context(origin_ca)  # trusts the origin's authority only, as a pinning client would

    async def scenario() -> tuple[bytes, list[Connection]]:
        origin = Origin()
        async with origin.running(_origin_context(origin_ca)):
            proxy = EgressProxy(resolve=FakeResolver({HOST: ["127.0.0.1"]}))
            async with proxy.channel(sock, "agent", _policy(origin.port), None, authority) as channel:
                answer = await _https(sock, origin.port, pinned, b"GET / HTTP/1.1\r\n\r\n")
                await asyncio.sleep(0.3)  # the proxy's side of the handshake sees the client's alert
        return answer, channel.records

    answer, records = _run(scenario)
    assert answer.startswith(b"handshake failed"), answer
    assert [(r.allowed, r.rule) for r in records] == [(True, CLIENT_TLS_RULE)]


def test_an_upstream_whose_certificate_the_service_does_not_trust_is_refused(
    sock: Path, tmp_path: Path, origin_ca: trustme.CA
) -> None:
    authority = Interception("run-1")  # the system trust store: the test authority is not in it
    client = _client_context(authority, tmp_path)

    async def scenario() -> tuple[bytes, list[Connection], list[bytearray]]:
        origin = Origin()
        async with origin.running(_origin_context(origin_ca)):
            proxy = EgressProxy(resolve=FakeResolver({HOST: ["127.0.0.1"]}))
            async with proxy.channel(sock, "agent", _policy(origin.port), None, authority) as channel:
                answer = await _https(sock, origin.port, client, b"GET / HTTP/1.1\r\n\r\n")
            await asyncio.sleep(0.1)
        return answer, channel.records, origin.received

    answer, records, received = _run(scenario)
    assert RESPONSE not in answer
    ((allowed, rule),) = [(r.allowed, r.rule) for r in records]
    assert allowed and rule.startswith(UPSTREAM_TLS_RULE) and "certificate not trusted" in rule, rule
    assert all(b"GET /" not in data for data in received), "nothing was sent to an unverified upstream"


def test_the_run_authority_is_a_ca_and_its_leaves_name_the_host(tmp_path: Path) -> None:
    from cryptography import x509

    authority = Interception("run-7")
    ca = x509.load_pem_x509_certificate(authority.pem)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert b"PRIVATE KEY" not in authority.write(tmp_path).read_bytes()
    assert authority.server_context(HOST) is authority.server_context(HOST)
    assert authority.server_context("10.0.0.1") is not authority.server_context(HOST)
