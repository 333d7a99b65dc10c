"""The scripted model server: turn selection, wire format, faults, and the real CLI driven against it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from claude_agent_sdk import (
    AssistantMessage,
    ClaudeAgentOptions,
    ClaudeSDKError,
    ResultError,
    ResultMessage,
    TextBlock,
    query,
)

from app.demo.model_server import (
    Drop,
    Hang,
    HttpError,
    Script,
    ScriptedModelServer,
    Stall,
    ToolCall,
    Turn,
    select_turn,
)
from tests.agent_env import agent_env

# A model name the CLI prices (sonnet 4.5: $3 / $15 per million tokens), so total_cost_usd is non-zero.
MODEL = "claude-sonnet-4-5"
DEFAULT = Script(trigger="", final_text="OK.")


def user(*texts: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": t} for t in texts]}


def assistant(text: str = "", *tool_ids: str) -> dict[str, Any]:
    blocks: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    blocks += [{"type": "tool_use", "id": i, "name": "Bash", "input": {}} for i in tool_ids]
    return {"role": "assistant", "content": blocks}


def tool_result(tool_use_id: str, content: str = "ok") -> dict[str, Any]:
    return {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": tool_use_id, "content": content}],
    }


# --- turn selection (no CLI) ---------------------------------------------------------------------------

IMPLEMENT = Script(
    "IMPLEMENT", [Turn(tool_calls=[ToolCall.bash("ls")]), Turn("Second.")], final_text="Built."
)
FIX = Script("FIX", [Turn("Fixing.", [ToolCall.bash("true")])], final_text="Fixed.")


def test_select_turn_follows_the_conversation() -> None:
    first = [
        {"role": "system", "content": "env"},
        user("<system-reminder>\nctx\n</system-reminder>", "IMPLEMENT x"),
    ]
    chosen = select_turn([IMPLEMENT, FIX], first, DEFAULT)
    assert (chosen.script, chosen.anchor, chosen.turn_index) == (IMPLEMENT, 1, 0)
    assert list(chosen.turn.tool_calls) == [ToolCall.bash("ls")]
    assert chosen.tool_use_id(0) == "toolu_s0_m1_t0_c0"

    second = [*first, assistant("", "toolu_s0_m1_t0_c0"), tool_result("toolu_s0_m1_t0_c0")]
    assert select_turn([IMPLEMENT, FIX], second, DEFAULT).turn.text == "Second."

    # The CLI may split one assistant turn into consecutive messages: still one turn.
    split = [
        *first,
        assistant("thinking"),
        assistant("", "toolu_s0_m1_t0_c0"),
        tool_result("toolu_s0_m1_t0_c0"),
    ]
    assert select_turn([IMPLEMENT, FIX], split, DEFAULT).turn_index == 1

    done = select_turn([IMPLEMENT, FIX], [*second, assistant("Second."), user("continue")], DEFAULT)
    assert done.script is IMPLEMENT and done.turn_index == 2 and done.turn.text == "Built."


def test_select_turn_on_a_resumed_conversation_plays_the_new_script() -> None:
    history = [
        user("IMPLEMENT ABC-1"),
        assistant("", "toolu_s0_m0_t0_c0"),
        tool_result("toolu_s0_m0_t0_c0"),
        assistant("Built."),
    ]
    resumed = [*history, user("<system-reminder>\nleft\n</system-reminder>", "FIX the lint errors")]
    chosen = select_turn([IMPLEMENT, FIX], resumed, DEFAULT)
    assert (chosen.script, chosen.anchor, chosen.turn_index) == (FIX, 4, 0)
    assert chosen.turn.text == "Fixing."
    assert chosen.tool_use_id(0) == "toolu_s1_m4_t0_c0"

    after = [*resumed, assistant("Fixing.", "toolu_s1_m4_t0_c0"), tool_result("toolu_s1_m4_t0_c0")]
    assert select_turn([IMPLEMENT, FIX], after, DEFAULT).turn.text == "Fixed."

    # A second fix round anchors at the newer prompt, so its tool ids differ from the first round's.
    again = [*after, assistant("Fixed."), user("FIX the tests")]
    round_two = select_turn([IMPLEMENT, FIX], again, DEFAULT)
    assert (round_two.anchor, round_two.turn_index) == (8, 0)
    assert round_two.tool_use_id(0) != chosen.tool_use_id(0)


def test_select_turn_after_an_interruption_follows_the_latest_prompt_in_a_folded_message() -> None:
    # After a crash the CLI sends the old prompt, the interrupted tool's result and the new prompt together.
    folded = [user("IMPLEMENT ABC-1", "No response requested.", "FIX what was left")]
    chosen = select_turn([IMPLEMENT, FIX], folded, DEFAULT)
    assert (chosen.script, chosen.turn_index) == (FIX, 0)


def test_select_turn_ignores_tool_output_and_reminders_and_falls_back_to_default() -> None:
    conversation = [
        user("IMPLEMENT it"),
        assistant("", "t1"),
        tool_result("t1", "the file says FIX"),
        user("<system-reminder>\nFIX\n</system-reminder>"),
    ]
    assert select_turn([IMPLEMENT, FIX], conversation, DEFAULT).script is IMPLEMENT

    other = select_turn([IMPLEMENT, FIX], [user("Generate a title for this session")], DEFAULT)
    assert other.script is DEFAULT and other.script_index is None and other.turn.text == "OK."


def test_a_failing_scenario_answers_500_instead_of_hanging() -> None:
    def broken(messages: object) -> str:
        raise LookupError("no such file in the scenario")

    with ScriptedModelServer([Script("GO", [Turn(broken)])]) as server:
        reply = _post(server, {"messages": [user("GO")], "stream": True})
        (record,) = server.message_requests
    assert reply.status_code == 500 and record.status == 500
    assert "no such file in the scenario" in reply.json()["error"]["message"]


def test_turn_needs_text_or_tool_calls() -> None:
    with pytest.raises(ValueError, match="text or at least one tool call"):
        Turn()


def test_turn_text_may_be_computed_from_the_conversation() -> None:
    script = Script("COUNT", [Turn(lambda messages: f"{len(messages)} messages so far")])
    with ScriptedModelServer([script]) as server:
        reply = _post(server, {"model": MODEL, "messages": [user("COUNT them")], "stream": False})
    assert reply.json()["content"] == [{"type": "text", "text": "1 messages so far"}]


# --- the wire format and recording (httpx, no CLI) -----------------------------------------------------


def _post(
    server: ScriptedModelServer, body: dict[str, Any], path: str = "/v1/messages?beta=true"
) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, headers={"x-api-key": "dummy"}, timeout=5)


def test_non_streaming_request_gets_a_message_json() -> None:
    script = Script(
        "WRITE", [Turn("Writing.", [ToolCall.write("a.txt", "hi\n")], input_tokens=120, output_tokens=7)]
    )
    with ScriptedModelServer([script]) as server:
        reply = _post(
            server, {"model": MODEL, "max_tokens": 100, "messages": [user("WRITE a file")], "stream": False}
        )
    assert reply.status_code == 200
    message = reply.json()
    assert message["type"] == "message" and message["role"] == "assistant" and message["model"] == MODEL
    assert message["id"].startswith("msg_")
    assert message["content"] == [
        {"type": "text", "text": "Writing."},
        {
            "type": "tool_use",
            "id": "toolu_s0_m0_t0_c0",
            "name": "Write",
            "input": {"file_path": "a.txt", "content": "hi\n"},
        },
    ]
    assert message["stop_reason"] == "tool_use" and message["stop_sequence"] is None
    assert message["usage"]["input_tokens"] == 120 and message["usage"]["output_tokens"] == 7


def _parse_sse(raw: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for chunk in raw.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in chunk.split("\n"))
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_streaming_request_gets_named_sse_events_that_rebuild_the_message() -> None:
    script = Script("GO", [Turn("Running.", [ToolCall.bash("echo hi")])])
    with ScriptedModelServer([script]) as server:
        reply = _post(server, {"model": MODEL, "messages": [user("GO")], "stream": True})
        (record,) = server.message_requests
    assert reply.headers["content-type"] == "text/event-stream"
    events = _parse_sse(reply.text)
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert all(data["type"] == name for name, data in events)
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta" and d["index"] == 0)
    partial = "".join(
        d["delta"]["partial_json"] for n, d in events if n == "content_block_delta" and d["index"] == 1
    )
    assert text == "Running."
    assert json.loads(partial) == {"command": "echo hi", "description": "Run a command"}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert events[-2][1]["usage"]["input_tokens"] > 0 and events[-2][1]["usage"]["output_tokens"] > 0
    assert record.query == "beta=true" and record.status == 200 and record.selection is not None


def test_other_paths_answer_404_and_are_recorded() -> None:
    with ScriptedModelServer() as server:
        reply = httpx.head(server.base_url + "/api/hello", timeout=5)
        count = httpx.post(server.base_url + "/v1/messages/count_tokens", json={"messages": []}, timeout=5)
        unexpected = server.unexpected_requests
    assert reply.status_code == 404 and count.status_code == 404
    assert count.json()["error"]["type"] == "not_found_error"
    assert [(r.method, r.path) for r in unexpected] == [
        ("HEAD", "/api/hello"),
        ("POST", "/v1/messages/count_tokens"),
    ]


def test_http_error_fault_applies_to_the_next_message_requests_only() -> None:
    with ScriptedModelServer([Script("GO", [Turn("fine")])]) as server:
        server.inject(HttpError(529), times=2)
        httpx.get(server.base_url + "/other", timeout=5)  # not a message request: no fault used
        first = _post(server, {"messages": [user("GO")], "stream": False})
        second = _post(server, {"messages": [user("GO")], "stream": False})
        third = _post(server, {"messages": [user("GO")], "stream": False})
        statuses = [r.status for r in server.requests]
    assert first.status_code == second.status_code == 529
    assert first.json() == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Scripted failure"},
    }
    assert third.status_code == 200 and third.json()["content"][0]["text"] == "fine"
    assert statuses == [404, 529, 529, 200]


def test_drop_without_streaming_closes_after_the_headers() -> None:
    with ScriptedModelServer([Script("GO", [Turn("fine")])]) as server:
        server.inject(Drop())
        with pytest.raises(httpx.RemoteProtocolError):
            _post(server, {"messages": [user("GO")], "stream": False})
        assert (
            _post(server, {"messages": [user("GO")], "stream": False}).json()["content"][0]["text"] == "fine"
        )


def test_recording_helpers_read_tool_results_tools_and_texts() -> None:
    script = Script("GO", [Turn("Listing.", [ToolCall.bash("ls")])], final_text="Listed.")
    with ScriptedModelServer([script]) as server:
        _post(server, {"messages": [user("GO")], "stream": False})
        conversation = [
            user("<system-reminder>\nctx\n</system-reminder>", "GO"),
            assistant("Listing.", "toolu_s0_m0_t0_c0"),
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_s0_m0_t0_c0",
                        "content": [{"type": "text", "text": "a.txt"}],
                        "is_error": False,
                    }
                ],
            },
        ]
        tools = [{"name": "Bash", "input_schema": {}}, {"name": "Write", "input_schema": {}}]
        final = _post(server, {"messages": conversation, "tools": tools, "stream": False})
        results = server.tool_results()
        offered = server.tools_offered()
        texts = server.conversation_texts()
    assert final.json()["content"][0]["text"] == "Listed."
    assert [(r.tool_use_id, r.content, r.is_error, r.tool_name) for r in results] == [
        ("toolu_s0_m0_t0_c0", "a.txt", False, "Bash")
    ]
    assert offered == ["Bash", "Write"]
    assert texts == ["GO", "Listing."]


def _raw_request(server: ScriptedModelServer, body: dict[str, Any]) -> socket.socket:
    port = int(server.base_url.rsplit(":", 1)[1])
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    head = f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode()
    sock.sendall(head + data)
    return sock


def test_stop_returns_quickly_with_hanging_and_stalled_connections() -> None:
    server = ScriptedModelServer([Script("GO", [Turn("hi")])])
    server.start()
    server.inject(Hang())
    server.inject(Stall())
    hanging = _raw_request(server, {"messages": [user("GO")], "stream": True})
    deadline = time.monotonic() + 5
    while len(server.message_requests) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    stalled = _raw_request(server, {"messages": [user("GO")], "stream": True})
    received = b""
    while b"event: message_start" not in received:
        chunk = stalled.recv(65536)
        assert chunk, received
        received += chunk
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 1.0
    for sock in (hanging, stalled):
        with sock:
            sock.settimeout(2)
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(65536) == b""  # closed by the server, nothing more sent
    with pytest.raises(RuntimeError):
        _ = server.base_url


def test_async_context_manager_serves_too() -> None:
    async def main() -> int:
        async with (
            ScriptedModelServer([Script("GO", [Turn("async")])]) as server,
            httpx.AsyncClient() as client,
        ):
            reply = await client.post(server.base_url + "/v1/messages", json={"messages": [user("GO")]})
        return reply.status_code

    assert asyncio.run(main()) == 200


# --- the real CLI (claude_agent_sdk) ------------------------------------------------------------------


def _options(server: ScriptedModelServer, tmp_path: Path, **kwargs: Any) -> ClaudeAgentOptions:
    cwd = tmp_path / "repo"
    cwd.mkdir(exist_ok=True)
    env_kwargs = {k: kwargs.pop(k) for k in ("max_retries", "api_timeout_ms") if k in kwargs}
    kwargs.setdefault("permission_mode", "acceptEdits")
    return ClaudeAgentOptions(
        cwd=str(cwd), model=MODEL, env=agent_env(server.base_url, tmp_path / "home", **env_kwargs), **kwargs
    )


def _run(prompt: str, options: ClaudeAgentOptions) -> tuple[list[Any], ClaudeSDKError | None]:
    """Collect every message of one query; the ResultError that follows an error result is returned."""

    async def main() -> tuple[list[Any], ClaudeSDKError | None]:
        messages: list[Any] = []
        try:
            async for message in query(prompt=prompt, options=options):
                messages.append(message)
        except ClaudeSDKError as exc:
            return messages, exc
        return messages, None

    return asyncio.run(main())


def _result(messages: list[Any]) -> ResultMessage:
    results = [m for m in messages if isinstance(m, ResultMessage)]
    assert len(results) == 1, messages
    return results[0]


@pytest.mark.e2e
def test_cli_write_tool_creates_the_file(tmp_path: Path) -> None:
    script = Script(
        "Create the greeting",
        [Turn("I will write it.", [ToolCall.write("greeting.txt", "hello from the script\n")])],
        final_text="Greeting written.",
    )
    with ScriptedModelServer([script]) as server:
        messages, error = _run("Create the greeting file", _options(server, tmp_path))
        results = server.tool_results("Write")
        offered = server.tools_offered()
    assert error is None
    assert (tmp_path / "repo" / "greeting.txt").read_text() == "hello from the script\n"
    result = _result(messages)
    assert result.subtype == "success" and not result.is_error and result.result == "Greeting written."
    assert result.session_id and result.num_turns >= 2
    assert result.total_cost_usd is not None and result.total_cost_usd > 0
    assert len(results) == 1 and not results[0].is_error
    assert {"Bash", "Edit", "Read", "Write"} <= set(offered)
    assert not server.unexpected_requests
    texts = [
        b.text
        for m in messages
        if isinstance(m, AssistantMessage)
        for b in m.content
        if isinstance(b, TextBlock)
    ]
    assert texts == ["I will write it.", "Greeting written."]


@pytest.mark.e2e
def test_cli_bash_results_reach_the_server_and_accept_edits_denies_interpreters(tmp_path: Path) -> None:
    script = Script(
        "Run the commands",
        [
            Turn(
                tool_calls=[
                    ToolCall.bash("echo bash-ran > out.txt && cat out.txt"),
                    ToolCall.bash("python3 -c 'print(1)'"),
                ]
            )
        ],
    )
    with ScriptedModelServer([script]) as server:
        messages, error = _run("Run the commands please", _options(server, tmp_path))
        by_id = {r.tool_use_id: r for r in server.tool_results("Bash")}
    assert error is None
    echo, python = by_id["toolu_s0_m0_t0_c0"], by_id["toolu_s0_m0_t0_c1"]
    assert not echo.is_error and echo.content.startswith("bash-ran")
    assert (tmp_path / "repo" / "out.txt").read_text() == "bash-ran\n"
    assert python.is_error and "requires approval" in python.content
    denials = _result(messages).permission_denials or []
    assert [d["tool_use_id"] for d in denials] == ["toolu_s0_m0_t0_c1"]


@pytest.mark.e2e
def test_cli_resume_sends_the_history_and_plays_the_second_script(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    implement = Script(
        "Implement ABC-1",
        [Turn(tool_calls=[ToolCall.write("app.txt", "version one\n")])],
        final_text="Implemented.",
    )
    fix = Script(
        "Fix the review findings",
        [Turn("Fixing.", [ToolCall.edit(str(repo / "app.txt"), "one", "two")])],
        final_text="Fixed.",
    )
    session_id = str(uuid.uuid4())
    with ScriptedModelServer([implement, fix]) as server:
        first, error = _run("Implement ABC-1: add app.txt", _options(server, tmp_path, session_id=session_id))
        assert error is None and _result(first).session_id == session_id
        mark = len(server.requests)
        second, error = _run(
            "Fix the review findings: say two", _options(server, tmp_path, resume=session_id)
        )
        resumed = server.requests[mark:]
        edits = server.tool_results("Edit")
    assert error is None
    result = _result(second)
    assert result.session_id == session_id and result.result == "Fixed."
    assert (repo / "app.txt").read_text() == "version two\n"
    opening = server.conversation_texts(resumed[0])
    assert opening[0] == "Implement ABC-1: add app.txt" and "Implemented." in opening
    assert opening[-1] == "Fix the review findings: say two"
    write_result = json.dumps(resumed[0].messages)
    assert "toolu_s0_m0_t0_c0" in write_result and "File created successfully" in write_result
    played = [(r.selection.script.trigger, r.selection.turn_index) for r in resumed if r.selection]
    assert played == [("Fix the review findings", 0), ("Fix the review findings", 1)]
    assert len(edits) == 1 and not edits[0].is_error


@pytest.mark.e2e
def test_cli_budget_is_exhausted_by_scripted_usage(tmp_path: Path) -> None:
    # One million input tokens on sonnet 4.5 cost $3, far over the $0.50 budget.
    script = Script(
        "Spend", [Turn(tool_calls=[ToolCall.bash("true")], input_tokens=1_000_000), Turn("again")]
    )
    with ScriptedModelServer([script]) as server:
        messages, error = _run("Spend it all", _options(server, tmp_path, max_budget_usd=0.5))
        played = [r.selection.turn_index for r in server.message_requests if r.selection]
        ran = server.tool_results()
    result = _result(messages)
    assert result.subtype == "error_max_budget_usd" and result.terminal_reason == "budget_exhausted"
    assert result.total_cost_usd is not None and result.total_cost_usd >= 3
    assert isinstance(error, ResultError)
    assert played == [0] and ran == []  # the CLI stops before running the tool of the costly turn


@pytest.mark.e2e
def test_cli_overloaded_api_ends_with_an_error_result_after_bounded_retries(tmp_path: Path) -> None:
    with ScriptedModelServer([Script("Hello", [Turn("never played")])]) as server:
        server.inject(HttpError(529), times=10)
        started = time.monotonic()
        messages, error = _run("Hello", _options(server, tmp_path, max_retries=1, api_timeout_ms=2000))
        elapsed = time.monotonic() - started
        statuses = [r.status for r in server.message_requests]
    result = _result(messages)
    assert result.is_error and result.api_error_status == 529 and result.terminal_reason == "api_error"
    assert isinstance(error, ResultError)
    assert statuses == [529, 529]  # the first try and one retry
    assert elapsed < 15


@pytest.mark.e2e
def test_cli_hang_before_headers_is_bounded_by_api_timeout(tmp_path: Path) -> None:
    with ScriptedModelServer([Script("Hello", [Turn("never played")])]) as server:
        server.inject(Hang(), times=10)
        started = time.monotonic()
        messages, error = _run("Hello", _options(server, tmp_path, max_retries=0, api_timeout_ms=1000))
        elapsed = time.monotonic() - started
    result = _result(messages)
    assert result.is_error and result.terminal_reason == "api_error" and "timed out" in (result.result or "")
    assert isinstance(error, ResultError)
    assert elapsed < 10


@pytest.mark.e2e
def test_cli_dropped_stream_falls_back_to_a_non_streaming_request(tmp_path: Path) -> None:
    with ScriptedModelServer([Script("Hello", [Turn("Recovered.")], final_text="unused")]) as server:
        server.inject(Drop())
        messages, error = _run("Hello there", _options(server, tmp_path, max_retries=2, api_timeout_ms=5000))
        requests = server.message_requests
    assert error is None and _result(messages).result == "Recovered."
    assert [(type(r.fault).__name__, r.body["stream"]) for r in requests] == [
        ("Drop", True),
        ("NoneType", False),
    ]
