"""The model proxy: tokens in, the real key out, answers streamed; and the real CLI driven through it."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from claude_agent_sdk import ClaudeAgentOptions, ClaudeSDKError, ResultMessage, query

from app.agent.model_proxy import MAX_BODY_BYTES, MAX_HEAD_BYTES, ModelProxy
from app.demo.model_server import Hang, Script, ScriptedModelServer, Stall, ToolCall, Turn
from tests.agent_env import agent_env
from tests.servers import free_port

T = TypeVar("T")

REAL_KEY = "sk-ant-api03-real-key-that-must-stay-in-the-service-0123456789"
MODEL = "claude-sonnet-4-5"
GREETING = Script("GO", [Turn("Hello through the proxy.")], final_text="Done.")


def _body(prompt: str = "GO", *, stream: bool = False) -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": 100,
        "stream": stream,
        "messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}],
    }


def _through_proxy(upstream: str, scenario: Callable[[ModelProxy, httpx.AsyncClient], Awaitable[T]]) -> T:
    """Run `scenario` with a started proxy in front of `upstream` and an httpx client pointed at it."""

    async def main() -> T:
        async with (
            ModelProxy(upstream, REAL_KEY) as proxy,
            httpx.AsyncClient(base_url=proxy.base_url, timeout=10) as client,
        ):
            return await scenario(proxy, client)

    return asyncio.run(main())


async def _raw(proxy: ModelProxy, data: bytes) -> bytes:
    """Send raw bytes to the proxy and read everything it answers until it closes."""
    port = int(proxy.base_url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(5):
            return await reader.read(1 << 20)
    finally:
        writer.close()


def _events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of an SSE body, with the per-response message id blanked out."""
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        data = json.loads(fields["data"])
        if "message" in data:
            data["message"]["id"] = "<id>"
        events.append((fields["event"], data))
    return events


# --- tokens and forwarding ---------------------------------------------------------------------------


def test_a_live_token_is_swapped_for_the_real_key_and_hop_headers_are_dropped() -> None:
    with ScriptedModelServer([GREETING]) as upstream:

        async def scenario(proxy: ModelProxy, client: httpx.AsyncClient) -> tuple[str, list[httpx.Response]]:
            token = proxy.issue()
            headers = {
                "x-api-key": token,
                "anthropic-version": "2023-06-01",
                "connection": "keep-alive, x-hop-secret",
                "x-hop-secret": "hop",
                "te": "trailers",
                "proxy-authorization": "Basic cHJveHk=",
            }
            by_key = await client.post("/v1/messages?beta=true", json=_body(), headers=headers)
            by_bearer = await client.post(
                "/v1/messages/count_tokens?beta=true",
                json=_body(),
                headers={"authorization": f"Bearer {token}"},
            )
            return token, [by_key, by_bearer]

        token, (by_key, by_bearer) = _through_proxy(upstream.base_url, scenario)
        requests = upstream.requests
        host = upstream.base_url.removeprefix("http://")

    assert by_key.status_code == 200, by_key.text
    assert by_key.json()["content"] == [{"type": "text", "text": "Hello through the proxy."}]
    # The scripted server has no count_tokens route: its own 404 comes back through the proxy.
    assert by_bearer.status_code == 404 and "count_tokens" in by_bearer.json()["error"]["message"]
    assert [(r.method, r.path, r.query) for r in requests] == [
        ("POST", "/v1/messages", "beta=true"),
        ("POST", "/v1/messages/count_tokens", "beta=true"),
    ]
    for request in requests:
        assert request.headers["x-api-key"] == REAL_KEY
        assert "authorization" not in request.headers
        assert token not in json.dumps(request.headers)
        assert request.headers["host"] == host
        assert request.body == _body()
    first = requests[0].headers
    assert first["anthropic-version"] == "2023-06-01"
    assert not {"x-hop-secret", "te", "proxy-authorization"} & set(first)
    assert REAL_KEY not in by_key.text + json.dumps(dict(by_key.headers))


def test_unknown_missing_and_revoked_tokens_get_401_and_nothing_reaches_the_upstream() -> None:
    with ScriptedModelServer([GREETING]) as upstream:

        async def scenario(proxy: ModelProxy, client: httpx.AsyncClient) -> list[httpx.Response]:
            token = proxy.issue()
            other = proxy.issue()
            proxy.revoke(token)
            proxy.revoke("never-issued")  # ignored
            return [
                await client.post("/v1/messages", json=_body(), headers={"x-api-key": "guess"}),
                await client.post("/v1/messages", json=_body()),
                await client.post("/v1/messages", json=_body(), headers={"x-api-key": token}),
                await client.post("/v1/messages", json=_body(), headers={"authorization": f"Bearer {token}"}),
                await client.post("/v1/messages", json=_body(), headers={"authorization": f"Basic {other}"}),
                await client.post("/v1/messages", json=_body(), headers={"x-api-key": other + "x"}),
            ]

        replies = _through_proxy(upstream.base_url, scenario)
        assert upstream.requests == []
    for reply in replies:
        assert reply.status_code == 401
        assert reply.json()["type"] == "error"
        assert reply.json()["error"]["type"] == "authentication_error"


def test_only_the_clis_two_endpoints_are_forwarded() -> None:
    """The real key opens files, batches and models too; the agent's token opens messages only."""
    with ScriptedModelServer([GREETING]) as upstream:

        async def scenario(proxy: ModelProxy, client: httpx.AsyncClient) -> list[int]:
            token = proxy.issue()
            refused = [
                ("HEAD", "/api/hello"),
                ("GET", "/v1"),
                ("GET", "/v10/models"),
                ("GET", "/v1/models"),
                ("POST", "/v1/files"),
                ("POST", "/v1/messages/batches"),
                ("GET", "/v1/messages"),
                ("POST", "/v1/messages/"),
                ("POST", "/v1/%6Dessages"),
            ]
            statuses = [
                (await client.request(method, path, headers={"x-api-key": token})).status_code
                for method, path in refused
            ]
            for target in ("/v1/../api/hello", "/v1/%2e%2e/api/hello", "/v1/messages/../files"):
                head = f"GET {target} HTTP/1.1\r\nhost: x\r\nx-api-key: {token}\r\n\r\n".encode()
                statuses.append(int((await _raw(proxy, head)).split(b" ")[1]))
            return statuses

        statuses = _through_proxy(upstream.base_url, scenario)
        assert upstream.requests == []
    assert statuses == [404] * 12


def test_the_sse_stream_arrives_intact_and_chunked() -> None:
    with ScriptedModelServer([GREETING]) as upstream:

        async def scenario(proxy: ModelProxy, client: httpx.AsyncClient) -> httpx.Response:
            return await client.post(
                "/v1/messages?beta=true", json=_body(stream=True), headers={"x-api-key": proxy.issue()}
            )

        proxied = _through_proxy(upstream.base_url, scenario)
        direct = httpx.post(upstream.base_url + "/v1/messages", json=_body(stream=True))

    assert proxied.status_code == 200
    assert proxied.headers["content-type"] == "text/event-stream"
    assert proxied.headers["transfer-encoding"] == "chunked"
    assert proxied.headers["connection"] == "close"
    names = [name for name, _ in _events(proxied.text)]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert _events(proxied.text) == _events(direct.text)


async def _stalling_upstream(closed: asyncio.Event) -> tuple[asyncio.Server, str]:
    """An upstream that sends the headers and one SSE event, then waits until its client hangs up."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        await reader.readexactly(length)
        event = b'event: message_start\ndata: {"type": "message_start"}\n\n'
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n" % (len(event), event)
        )
        await writer.drain()
        await reader.read()  # EOF: the proxy gave up on this request
        closed.set()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def test_events_are_relayed_before_the_stream_ends_and_a_client_hangup_cancels_the_upstream() -> None:
    async def main() -> float:
        closed = asyncio.Event()
        server, url = await _stalling_upstream(closed)
        async with server, ModelProxy(url, REAL_KEY) as proxy, httpx.AsyncClient(timeout=10) as client:
            request = client.build_request(
                "POST",
                proxy.base_url + "/v1/messages",
                json=_body(stream=True),
                headers={"x-api-key": proxy.issue()},
            )
            response = await client.send(request, stream=True)
            async for line in response.aiter_lines():  # the upstream has not finished: nothing is buffered
                if line.startswith("event: "):
                    assert line == "event: message_start"
                    break
            assert not closed.is_set()
            hung_up = time.monotonic()
            await response.aclose()  # a partly read response: httpx closes the connection
            async with asyncio.timeout(5):
                await closed.wait()
            return time.monotonic() - hung_up

    assert asyncio.run(main()) < 1.0


def test_a_large_body_passes_unchanged() -> None:
    text = "x" * (8 * 1024 * 1024)
    with ScriptedModelServer([GREETING]) as upstream:

        async def scenario(proxy: ModelProxy, client: httpx.AsyncClient) -> int:
            body = _body(f"GO {text}")
            reply = await client.post("/v1/messages", json=body, headers={"x-api-key": proxy.issue()})
            return reply.status_code

        assert _through_proxy(upstream.base_url, scenario) == 200
        [request] = upstream.requests
    assert request.messages[0]["content"][0]["text"] == f"GO {text}"


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (b"POST /v1/messages HTTP/1.1\r\nx-api-key: {token}\r\ntransfer-encoding: chunked\r\n\r\n", 411),
        (
            b"POST /v1/messages HTTP/1.1\r\nx-api-key: {token}\r\ncontent-length: %d\r\n\r\n"
            % (MAX_BODY_BYTES + 1),
            413,
        ),
        (b"POST /v1/messages HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n", 400),
        (b"POST /v1/messages HTTP/1.1\r\ncontent-length: -1\r\n\r\n", 400),
        (b"POST /v1/messages HTTP/1.1\r\ncontent-length: \xb2\r\n\r\n", 400),
        (
            b"GET /v1/models HTTP/1.1\r\nx-api-key: {token}\r\nx-big: %s\r\n\r\n" % (b"a" * MAX_HEAD_BYTES),
            431,
        ),
        (b"GET /v1/models HTTP/1.0\r\nx-api-key: {token}\r\n\r\n", 505),
        (b"GET /v1/models HTTP/1.1\r\nx-api-key: {token}\r\n folded: value\r\n\r\n", 400),
        (b"GET /v1/models HTTP/1.1\r\nbad name: value\r\n\r\n", 400),
        (b"GET http://example.com/v1/models HTTP/1.1\r\n\r\n", 400),
    ],
)
def test_malformed_or_oversized_requests_are_refused(request_head: bytes, status: int) -> None:
    with ScriptedModelServer([GREETING]) as upstream:

        async def scenario(proxy: ModelProxy, client: httpx.AsyncClient) -> bytes:
            return await _raw(proxy, request_head.replace(b"{token}", proxy.issue().encode()))

        answer = _through_proxy(upstream.base_url, scenario)
        assert upstream.requests == []
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    assert json.loads(body)["type"] == "error"


def test_expect_100_continue_is_answered_before_the_body_is_read() -> None:
    body = json.dumps(_body()).encode()
    with ScriptedModelServer([GREETING]) as upstream:

        async def scenario(proxy: ModelProxy, client: httpx.AsyncClient) -> tuple[bytes, bytes]:
            port = int(proxy.base_url.rsplit(":", 1)[1])
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            head = (
                f"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: {proxy.issue()}\r\n"
                "content-type: application/json\r\nexpect: 100-continue\r\n"
                f"content-length: {len(body)}\r\n\r\n"
            )
            writer.write(head.encode())
            async with asyncio.timeout(5):
                interim = await reader.readuntil(b"\r\n\r\n")
                writer.write(body)
                answer = await reader.read()
            writer.close()
            return interim, answer

        interim, answer = _through_proxy(upstream.base_url, scenario)
        [request] = upstream.requests
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Hello through the proxy." in answer and answer.endswith(b"0\r\n\r\n")
    assert "expect" not in request.headers and request.body == _body()


def test_an_unreachable_upstream_is_a_502_without_the_key(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    async def scenario(proxy: ModelProxy, client: httpx.AsyncClient) -> httpx.Response:
        return await client.post("/v1/messages", json=_body(), headers={"x-api-key": proxy.issue()})

    started = time.monotonic()
    reply = _through_proxy(f"http://127.0.0.1:{free_port()}", scenario)
    assert time.monotonic() - started < 5
    assert reply.status_code == 502
    assert reply.json()["error"]["type"] == "api_error"
    assert "ConnectError" in reply.json()["error"]["message"]
    assert REAL_KEY not in reply.text + json.dumps(dict(reply.headers))
    messages = [record.getMessage() for record in caplog.records]
    assert "model proxy upstream failed" in messages
    for record in caplog.records:
        assert REAL_KEY not in repr(vars(record))


def test_stop_returns_quickly_with_stalled_and_hanging_upstream_streams() -> None:
    async def main(upstream: ScriptedModelServer) -> tuple[float, list[BaseException | None]]:
        upstream.inject(Stall())
        upstream.inject(Hang())
        proxy = ModelProxy(upstream.base_url, REAL_KEY)
        await proxy.start()
        async with httpx.AsyncClient(timeout=10) as client:
            token = proxy.issue()

            async def stream_until_gone(started: asyncio.Event) -> None:
                request = client.build_request(
                    "POST",
                    proxy.base_url + "/v1/messages",
                    json=_body(stream=True),
                    headers={"x-api-key": token},
                )
                response = await client.send(request, stream=True)
                async for line in response.aiter_lines():
                    if line == "event: message_start":
                        started.set()

            stalled_started = asyncio.Event()
            stalled = asyncio.create_task(stream_until_gone(stalled_started))
            await asyncio.wait_for(stalled_started.wait(), 10)
            hanging = asyncio.create_task(
                client.post(proxy.base_url + "/v1/messages", json=_body(), headers={"x-api-key": token})
            )
            while len(upstream.message_requests) < 2:
                await asyncio.sleep(0.01)
            began = time.monotonic()
            await proxy.stop()
            took = time.monotonic() - began
            outcomes = await asyncio.gather(stalled, hanging, return_exceptions=True)
        return took, [o if isinstance(o, BaseException) else None for o in outcomes]

    with ScriptedModelServer([GREETING]) as upstream:
        took, outcomes = asyncio.run(main(upstream))
    assert took < 1.0
    # Both clients see their connection cut: a truncated stream and no answer at all.
    assert all(isinstance(outcome, httpx.TransportError) for outcome in outcomes), outcomes


def test_the_proxy_is_in_the_running_loop_and_says_when_it_is_not_running() -> None:
    proxy = ModelProxy("https://api.anthropic.com", REAL_KEY)
    with pytest.raises(RuntimeError):
        _ = proxy.base_url
    with pytest.raises(ValueError):
        ModelProxy("ftp://example.com", REAL_KEY)
    with pytest.raises(ValueError):
        ModelProxy("https://api.anthropic.com", "")

    async def main() -> str:
        async with proxy:
            url = proxy.base_url
            with pytest.raises(RuntimeError):
                await proxy.start()
        return url

    assert asyncio.run(main()).startswith("http://127.0.0.1:")
    asyncio.run(proxy.stop())  # stopping twice is fine


# --- the real CLI ------------------------------------------------------------------------------------


@asynccontextmanager
async def _cli_through_proxy(
    upstream: ScriptedModelServer, tmp_path: Path, **env: str
) -> AsyncIterator[tuple[ModelProxy, Callable[[str, str], ClaudeAgentOptions]]]:
    """A proxy in this loop, and options for a CLI whose only key is a token it issued."""
    async with ModelProxy(upstream.base_url, REAL_KEY) as proxy:

        def options(token: str, cwd: str) -> ClaudeAgentOptions:
            return ClaudeAgentOptions(
                cwd=cwd,
                model=MODEL,
                permission_mode="acceptEdits",
                allowed_tools=["Bash(env)"],
                setting_sources=[],
                env={
                    **agent_env(proxy.base_url, tmp_path / "home"),
                    "ANTHROPIC_API_KEY": token,
                    **env,
                },
            )

        yield proxy, options


async def _collect(prompt: str, options: ClaudeAgentOptions) -> tuple[list[Any], ClaudeSDKError | None]:
    messages: list[Any] = []
    try:
        async for message in query(prompt=prompt, options=options):
            messages.append(message)
    except ClaudeSDKError as exc:
        return messages, exc
    return messages, None


@pytest.mark.e2e
def test_the_cli_works_through_the_proxy_and_its_tools_never_see_the_real_key(tmp_path: Path) -> None:
    script = Script(
        "Write the note",
        [
            Turn("Writing it.", [ToolCall.write("note.txt", "through the proxy\n")]),
            Turn("Checking my environment.", [ToolCall.bash("env", "Show the environment")]),
        ],
        final_text="All done.",
    )
    repo = tmp_path / "repo"
    repo.mkdir()

    async def main(upstream: ScriptedModelServer) -> tuple[str, str, list[Any], ClaudeSDKError | None]:
        async with _cli_through_proxy(upstream, tmp_path) as (proxy, options):
            token = proxy.issue()
            try:
                messages, error = await _collect("Write the note please", options(token, str(repo)))
            finally:
                proxy.revoke(token)
            return token, proxy.base_url, messages, error

    with ScriptedModelServer([script]) as upstream:
        token, base_url, messages, error = asyncio.run(main(upstream))
        requests = upstream.requests
        [env_result] = upstream.tool_results("Bash")
        writes = upstream.tool_results("Write")

    assert error is None, error
    result = [m for m in messages if isinstance(m, ResultMessage)][-1]
    assert result.subtype == "success" and result.result == "All done.", result
    assert (repo / "note.txt").read_text() == "through the proxy\n"
    assert len(writes) == 1 and not writes[0].is_error
    # What code run by the agent sees: the per-phase token and the proxy, never the real key.
    assert not env_result.is_error, env_result.content
    assert f"ANTHROPIC_API_KEY={token}" in env_result.content
    assert f"ANTHROPIC_BASE_URL={base_url}" in env_result.content
    assert REAL_KEY not in env_result.content
    # What the upstream saw: the real key on every request, the token never.
    assert len(requests) >= 3
    assert all(r.headers.get("x-api-key") == REAL_KEY for r in requests)
    assert all(token not in json.dumps(r.headers) for r in requests)
    assert all(r.path.startswith("/v1/") for r in requests)


@pytest.mark.e2e
def test_the_cli_with_a_revoked_token_gets_401_and_the_upstream_sees_nothing(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()

    async def main(upstream: ScriptedModelServer) -> tuple[list[Any], ClaudeSDKError | None]:
        async with _cli_through_proxy(upstream, tmp_path, CLAUDE_CODE_MAX_RETRIES="0") as (proxy, options):
            token = proxy.issue()
            proxy.revoke(token)
            return await _collect("GO", options(token, str(repo)))

    with ScriptedModelServer([GREETING]) as upstream:
        messages, _ = asyncio.run(main(upstream))
        assert upstream.requests == []
    result = [m for m in messages if isinstance(m, ResultMessage)][-1]
    assert result.is_error and result.api_error_status == 401, result
