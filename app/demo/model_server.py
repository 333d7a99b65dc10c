"""A scripted stand-in for the Anthropic Messages API on 127.0.0.1, for tests and `auto-code demo`.

The real Claude Code CLI (bundled in claude-agent-sdk) talks to it through `ANTHROPIC_BASE_URL`. The
server plays a scenario: a list of `Script`s, each started by a `trigger` (a substring of the user prompt)
and made of `Turn`s (text and/or tool calls). The next turn is derived from the conversation the CLI
sends, never from a request counter, so resumed sessions and repeated fix rounds just work:

    script = Script("Add a greeting", [Turn("Adding it.", [ToolCall.write("hi.txt", "hi")])])
    with ScriptedModelServer([script]) as server:
        options = ClaudeAgentOptions(env={"ANTHROPIC_BASE_URL": server.base_url, ...}, ...)

Every request is recorded (`requests`, `tool_results()`, `tools_offered()`, `conversation_texts()`), other
paths answer 404 and are recorded too, and `inject()` makes the next message requests fail (HTTP error,
hang before headers, stall after `message_start`, drop mid-stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

from app.logger import get_logger

log = get_logger(__name__)

Message = Mapping[str, Any]
Conversation = Sequence[Message]
TextSource = str | Callable[[Conversation], str]

_HOST = "127.0.0.1"
MESSAGES_PATH = "/v1/messages"
DEFAULT_MODEL = "claude-sonnet-4-5"
DEFAULT_FAULT_SECONDS = 600.0
_SYSTEM_REMINDER = "<system-reminder>"
_SSE_HEADERS = {"content-type": "text/event-stream", "cache-control": "no-cache", "connection": "close"}
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    529: "Overloaded",
}


# --- the scenario ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    """One tool_use block the model asks for: the CLI's tool `name` and its `input`."""

    name: str
    input: Mapping[str, Any]

    @classmethod
    def write(cls, file_path: str, content: str) -> ToolCall:
        """Write `content` to `file_path` (absolute, or relative to the CLI's cwd)."""
        return cls("Write", {"file_path": file_path, "content": content})

    @classmethod
    def edit(cls, file_path: str, old_string: str, new_string: str) -> ToolCall:
        """Replace `old_string` by `new_string` in a file the session has already read."""
        return cls("Edit", {"file_path": file_path, "old_string": old_string, "new_string": new_string})

    @classmethod
    def read(cls, file_path: str) -> ToolCall:
        """Read a file."""
        return cls("Read", {"file_path": file_path})

    @classmethod
    def bash(cls, command: str, description: str = "Run a command") -> ToolCall:
        """Run a shell command through the CLI's Bash tool."""
        return cls("Bash", {"command": command, "description": description})


@dataclass(frozen=True)
class Turn:
    """One assistant message: text and/or tool calls, with optional usage to report for it.

    `text` may be a callable of the conversation received. Without explicit token counts the server
    reports roughly one token per four bytes of request body and of reply.
    """

    text: TextSource | None = None
    tool_calls: Sequence[ToolCall] = ()
    input_tokens: int | None = None
    output_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.text is None and not self.tool_calls:
            raise ValueError("a Turn needs text or at least one tool call")


@dataclass(frozen=True)
class Script:
    """The turns to play after a user prompt containing `trigger`; then `final_text` ends the exchange."""

    trigger: str
    turns: Sequence[Turn] = ()
    final_text: str = "Done."


@dataclass(frozen=True)
class Selection:
    """Which turn answers a conversation: the script (None: the default), its anchor and turn index."""

    script: Script
    script_index: int | None
    anchor: int
    turn_index: int

    @property
    def turn(self) -> Turn:
        """The scripted turn, or the final end_turn text once the script is exhausted."""
        if self.turn_index < len(self.script.turns):
            return self.script.turns[self.turn_index]
        return Turn(text=self.script.final_text)

    def tool_use_id(self, call_index: int) -> str:
        """The deterministic id of a tool call of this turn (unique within one conversation)."""
        script = "d" if self.script_index is None else str(self.script_index)
        return f"toolu_s{script}_m{self.anchor}_t{self.turn_index}_c{call_index}"


def prompt_texts(message: Message) -> list[str]:
    """The text blocks (or string content) of a message, without tool blocks and `<system-reminder>`s."""
    content = message.get("content")
    if isinstance(content, str):
        return [content]
    texts: list[str] = []
    for block in content if isinstance(content, list) else []:
        if isinstance(block, dict) and block.get("type") == "text":
            text = str(block.get("text", ""))
            if not text.lstrip().startswith(_SYSTEM_REMINDER):
                texts.append(text)
    return texts


def select_turn(scripts: Sequence[Script], messages: Conversation, default: Script) -> Selection:
    """Choose the next turn from the conversation alone.

    The anchor is the most recent user message whose prompt text contains a script's trigger (within a
    message, the latest text block with a trigger decides: the CLI folds a prompt sent after an
    interruption into the message that holds the earlier one; then the first matching script wins); the
    turn index is the number of assistant turns (runs of consecutive assistant
    messages) after it. Without any match the default script is anchored at the latest user prompt.
    """
    anchor, script_index = -1, None
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if message.get("role") != "user":
            continue
        texts = prompt_texts(message)
        if not texts:
            continue
        if anchor < 0:
            anchor = index
        hit = None
        for text in reversed(texts):
            hit = next((i for i, s in enumerate(scripts) if s.trigger in text), None)
            if hit is not None:
                break
        if hit is not None:
            anchor, script_index = index, hit
            break
    turns, previous_role = 0, None
    for message in messages[anchor + 1 :]:
        role = message.get("role")
        if role == "assistant" and previous_role != "assistant":
            turns += 1
        previous_role = role
    script = default if script_index is None else scripts[script_index]
    return Selection(script, script_index, max(anchor, 0), turns)


# --- faults ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpError:
    """Answer with this HTTP status and an Anthropic error body (529: overloaded_error)."""

    status: int = 529
    message: str = "Scripted failure"


@dataclass(frozen=True)
class Hang:
    """Send nothing, not even headers, until the client goes away or `seconds` pass."""

    seconds: float = DEFAULT_FAULT_SECONDS


@dataclass(frozen=True)
class Stall:
    """Send the headers and `message_start` (or only headers), then wait for the client to go or `seconds`."""

    seconds: float = DEFAULT_FAULT_SECONDS


@dataclass(frozen=True)
class Drop:
    """Send the headers and `message_start` (or only headers), then close; the CLI retries unstreamed."""


Fault = HttpError | Hang | Stall | Drop


# --- recording ---------------------------------------------------------------------------------------


@dataclass
class RecordedRequest:
    """One request as received, and how it was answered (`status` None: no response was sent)."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Any
    status: int | None = None
    fault: Fault | None = None
    selection: Selection | None = None

    @property
    def messages(self) -> list[Message]:
        """The `messages` of a Messages API body (empty for anything else)."""
        if isinstance(self.body, dict) and isinstance(self.body.get("messages"), list):
            return list(self.body["messages"])
        return []


@dataclass(frozen=True)
class ToolResult:
    """A tool_result block the CLI sent back, with the name of the call it answers when known."""

    tool_use_id: str
    content: str
    is_error: bool
    tool_name: str | None


def _block_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(block.get("text", "")) for block in content if isinstance(block, dict) and "text" in block
        )
    return ""


# --- the wire format ---------------------------------------------------------------------------------


def _content_blocks(selection: Selection, messages: Conversation) -> list[dict[str, Any]]:
    turn = selection.turn
    blocks: list[dict[str, Any]] = []
    if turn.text is not None:
        text = turn.text if isinstance(turn.text, str) else turn.text(messages)
        blocks.append({"type": "text", "text": text})
    for index, call in enumerate(turn.tool_calls):
        blocks.append(
            {
                "type": "tool_use",
                "id": selection.tool_use_id(index),
                "name": call.name,
                "input": dict(call.input),
            }
        )
    return blocks


def _usage(turn: Turn, request_bytes: int, blocks: list[dict[str, Any]]) -> dict[str, int]:
    reply_bytes = len(json.dumps(blocks))
    return {
        "input_tokens": turn.input_tokens if turn.input_tokens is not None else max(1, request_bytes // 4),
        "output_tokens": turn.output_tokens if turn.output_tokens is not None else max(1, reply_bytes // 4),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def _sse(event: str, data: Mapping[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def _halves(text: str) -> list[str]:
    # Two deltas per block, so the client's delta accumulation is exercised.
    middle = len(text) // 2
    return [part for part in (text[:middle], text[middle:]) if part] or [""]


def stream_events(message: Mapping[str, Any]) -> list[bytes]:
    """Render a complete Message as the SSE events of a streaming response."""
    usage = dict(message["usage"])
    start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
    events = [_sse("message_start", {"type": "message_start", "message": start})]
    for index, block in enumerate(message["content"]):
        if block["type"] == "text":
            shell: dict[str, Any] = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": part} for part in _halves(block["text"])]
        else:
            shell = {**block, "input": {}}
            deltas = [
                {"type": "input_json_delta", "partial_json": part}
                for part in _halves(json.dumps(block["input"]))
            ]
        events.append(
            _sse(
                "content_block_start", {"type": "content_block_start", "index": index, "content_block": shell}
            )
        )
        for delta in deltas:
            events.append(
                _sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
            )
        events.append(_sse("content_block_stop", {"type": "content_block_stop", "index": index}))
    events.append(
        _sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                "usage": usage,
            },
        )
    )
    events.append(_sse("message_stop", {"type": "message_stop"}))
    return events


def _json_response(status: int, payload: Mapping[str, Any]) -> list[bytes]:
    """The head and the body of a JSON response."""
    data = json.dumps(payload).encode()
    headers = {"content-type": "application/json", "content-length": str(len(data))}
    return [_response_head(status, headers), data]


def _response_head(status: int, headers: Mapping[str, str]) -> bytes:
    reason = _REASONS.get(status, "Error")
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class _ClientGone(Exception):
    """The client closed the connection (or sent something that is not HTTP)."""


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes]:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError) as exc:
        raise _ClientGone from exc
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3:
        raise _ClientGone
    method, target, _version = parts
    headers: dict[str, str] = {}
    for line in header_lines:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    try:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = bytearray()
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                body += await reader.readexactly(size)
                await reader.readexactly(2)
            await reader.readuntil(b"\r\n")  # no trailers are expected: the empty line ends the body
        else:
            body = bytearray(await reader.readexactly(int(headers.get("content-length", "0"))))
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError) as exc:
        raise _ClientGone from exc
    return method, target, headers, bytes(body)


async def _wait_until_gone(reader: asyncio.StreamReader, seconds: float) -> None:
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(seconds):
            while await reader.read(65536):
                pass


# --- the server --------------------------------------------------------------------------------------


class ScriptedModelServer:
    """The scripted Messages API on 127.0.0.1, served from a background thread with its own event loop.

    Use it as `with ScriptedModelServer(scripts) as server:` (or `async with`), then point the CLI at
    `server.base_url`. `stop()` returns within about a second even with hanging connections open.
    """

    def __init__(
        self,
        scripts: Sequence[Script] = (),
        *,
        default: Script | None = None,
        port: int = 0,
    ) -> None:
        self.scripts = list(scripts)
        self.default = default or Script(trigger="", final_text="OK.")
        self._bind_port = port
        self._port = port
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._faults: list[Fault] = []
        self._issued: dict[str, ToolCall] = {}
        self._message_counter = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    # --- life cycle ---

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:PORT`, the value for ANTHROPIC_BASE_URL."""
        if self._server is None:
            raise RuntimeError("the model server is not running")
        return f"http://{_HOST}:{self._port}"

    def start(self) -> None:
        """Bind a free port and serve from a background thread; returns once the socket listens."""
        if self._thread is not None:
            raise RuntimeError("the model server is already running")
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._serve_connection, _HOST, self._bind_port)
                )
                self._port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # handed to the starting thread
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="scripted-model-server", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = self._loop = None
            raise failure[0]
        log.info("model server started", base_url=self.base_url, scripts=len(self.scripts))

    def stop(self) -> None:
        """Abort every open connection, stop the loop and join the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=1)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=2)
        self._loop = self._thread = self._server = None
        log.info("model server stopped", requests=len(self.requests))

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task, writer in list(self._connections.items()):
            writer.transport.abort()
            task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=0.5)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.stop)

    # --- faults and records ---

    def inject(self, fault: Fault, times: int = 1) -> None:
        """Answer the next `times` POST /v1/messages requests with `fault` (queued after earlier faults)."""
        with self._lock:
            self._faults.extend([fault] * times)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, in order (a copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def message_requests(self) -> list[RecordedRequest]:
        """The POST /v1/messages requests received so far."""
        return [r for r in self.requests if r.method == "POST" and r.path == MESSAGES_PATH]

    @property
    def unexpected_requests(self) -> list[RecordedRequest]:
        """Requests to any other path (answered 404)."""
        return [r for r in self.requests if not (r.method == "POST" and r.path == MESSAGES_PATH)]

    def tool_results(self, tool_name: str | None = None) -> list[ToolResult]:
        """Every distinct tool_result block seen in any request, in first-seen order."""
        with self._lock:
            issued = dict(self._issued)
        seen: dict[str, ToolResult] = {}
        for request in self.message_requests:
            for message in request.messages:
                content = message.get("content")
                for block in content if isinstance(content, list) else []:
                    if not isinstance(block, dict) or block.get("type") != "tool_result":
                        continue
                    tool_use_id = str(block.get("tool_use_id"))
                    if tool_use_id not in seen:
                        call = issued.get(tool_use_id)
                        seen[tool_use_id] = ToolResult(
                            tool_use_id,
                            _block_text(block.get("content")),
                            bool(block.get("is_error", False)),
                            call.name if call else None,
                        )
        return [r for r in seen.values() if tool_name is None or r.tool_name == tool_name]

    def tools_offered(self) -> list[str]:
        """The tool names offered in the latest message request."""
        requests = self.message_requests
        if not requests or not isinstance(requests[-1].body, dict):
            return []
        return [
            str(tool.get("name")) for tool in requests[-1].body.get("tools") or [] if isinstance(tool, dict)
        ]

    def conversation_texts(self, request: RecordedRequest | None = None) -> list[str]:
        """The prompts and assistant texts of `request` (default: the latest), without system reminders."""
        if request is None:
            requests = self.message_requests
            if not requests:
                return []
            request = requests[-1]
        return [
            text
            for message in request.messages
            if message.get("role") in ("user", "assistant")
            for text in prompt_texts(message)
        ]

    # --- serving ---

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        try:
            keep_alive = True
            while keep_alive:
                method, target, headers, raw = await _read_request(reader)
                keep_alive = await self._answer(method, target, headers, raw, reader, writer)
        except (_ClientGone, ConnectionError):
            pass
        finally:
            self._connections.pop(task, None)
            writer.transport.abort()

    async def _answer(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        raw: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        url = urlsplit(target)
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        record = RecordedRequest(method, url.path, url.query, headers, body)
        is_message = method == "POST" and url.path == MESSAGES_PATH
        with self._lock:
            self._requests.append(record)
            if is_message and self._faults:
                record.fault = self._faults.pop(0)
        if not is_message:
            record.status = 404
            log.warning("model server unexpected request", method=method, path=url.path)
            await self._send_json(writer, 404, _error_body(404, f"no route for {method} {url.path}"))
            return True
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            record.status = 400
            await self._send_json(writer, 400, _error_body(400, "body must be a JSON object with messages"))
            return True
        if isinstance(record.fault, HttpError):
            record.status = record.fault.status
            log.info("model server fault", fault="http_error", status=record.fault.status)
            await self._send_json(
                writer, record.fault.status, _error_body(record.fault.status, record.fault.message)
            )
            return True
        if isinstance(record.fault, Hang):
            log.info("model server fault", fault="hang")
            await _wait_until_gone(reader, record.fault.seconds)
            return False

        messages: list[Message] = body["messages"]
        try:
            selection = select_turn(self.scripts, messages, self.default)
            record.selection = selection
            message = self._message(selection, messages, body, len(raw))
        except Exception as exc:  # a broken scenario (say, a text callable that raised) must be visible
            log.exception("model server scenario failed")
            record.status = 500
            await self._send_json(writer, 500, _error_body(500, f"scenario failed: {exc!r}"))
            return True
        record.status = 200
        log.info(
            "model request answered",
            trigger=selection.script.trigger,
            turn=selection.turn_index,
            stop_reason=message["stop_reason"],
            stream=bool(body.get("stream")),
        )
        streaming = bool(body.get("stream"))
        if streaming:
            head = _response_head(200, {**_SSE_HEADERS, "request-id": f"req_{message['id']}"})
            chunks = [head, *stream_events(message)]
        else:
            chunks = _json_response(200, message)
        if isinstance(record.fault, Stall | Drop):
            # The headers and `message_start` (without streaming: the headers alone), then silence.
            log.info("model server fault", fault=type(record.fault).__name__.lower())
            writer.write(b"".join(chunks[:2] if streaming else chunks[:1]))
            await writer.drain()
            if isinstance(record.fault, Stall):
                await _wait_until_gone(reader, record.fault.seconds)
            return False
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
        return not streaming

    def _message(
        self, selection: Selection, messages: Conversation, body: Mapping[str, Any], size: int
    ) -> dict[str, Any]:
        blocks = _content_blocks(selection, messages)
        with self._lock:
            self._message_counter += 1
            message_id = f"msg_scripted_{self._message_counter:04d}"
            for index, call in enumerate(selection.turn.tool_calls):
                self._issued[selection.tool_use_id(index)] = call
        return {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": str(body.get("model") or DEFAULT_MODEL),
            "content": blocks,
            "stop_reason": "tool_use" if selection.turn.tool_calls else "end_turn",
            "stop_sequence": None,
            "usage": _usage(selection.turn, size, blocks),
        }

    @staticmethod
    async def _send_json(writer: asyncio.StreamWriter, status: int, payload: Mapping[str, Any]) -> None:
        writer.write(b"".join(_json_response(status, payload)))
        await writer.drain()


def _error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message}}
