"""The one place that starts subprocesses: argv only, explicit cwd and environment, bounded everything."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.errors import CommandError, CommandTimeout
from app.logger import REDACTED, get_logger, redact

log = get_logger(__name__)

DEFAULT_MAX_OUTPUT = 1024 * 1024
KILL_GRACE_SECONDS = 2.0
_READ_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Completed:
    """A finished subprocess: redacted argv, exit code, captured output and how long it took."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    duration: float

    @property
    def output(self) -> str:
        """stdout and stderr together, for messages and fix prompts."""
        return "\n".join(part for part in (self.stdout.rstrip(), self.stderr.rstrip()) if part)


class _BoundedBuffer:
    """Keeps the head and the tail of a stream, dropping the middle past `limit` bytes."""

    def __init__(self, limit: int) -> None:
        self._half = max(limit // 2, 1)
        self._head = bytearray()
        self._tail = bytearray()
        self._dropped = 0

    def feed(self, chunk: bytes) -> None:
        room = self._half - len(self._head)
        if room > 0:
            self._head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self._tail += chunk
            excess = len(self._tail) - self._half
            if excess > 0:
                del self._tail[:excess]
                self._dropped += excess

    def text(self) -> str:
        middle = f"\n[... {self._dropped} bytes dropped ...]\n".encode() if self._dropped else b""
        return bytes(self._head + middle + self._tail).decode("utf-8", errors="replace")


def redact_argv(argv: Iterable[str], secrets: Iterable[str] = ()) -> list[str]:
    """Return argv with every registered and every given secret value replaced."""
    extra = sorted((s for s in secrets if s), key=len, reverse=True)
    cleaned = []
    for arg in argv:
        for secret in extra:
            arg = arg.replace(secret, REDACTED)
        cleaned.append(redact(arg))
    return cleaned


def _kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


async def _drain(stream: asyncio.StreamReader | None, buffer: _BoundedBuffer) -> None:
    if stream is None:
        return
    while chunk := await stream.read(_READ_CHUNK):
        buffer.feed(chunk)


async def _exited(process: asyncio.subprocess.Process) -> None:
    """Wait for the leader to exit; on 3.11 `Process.wait()` also waits for every pipe to close."""
    delay = 0.005
    while process.returncode is None:
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _stop(process: asyncio.subprocess.Process) -> None:
    """End the whole process group: SIGTERM, a short grace, then SIGKILL."""
    _kill_group(process.pid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(process.wait(), KILL_GRACE_SECONDS)
    # Children may outlive the leader; the group id stays valid while any member lives.
    _kill_group(process.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        await process.wait()


async def run(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    timeout: float,
    check: bool = True,
    secrets: Iterable[str] = (),
    input: bytes | None = None,
    max_output: int = DEFAULT_MAX_OUTPUT,
    on_start: Callable[[int], None] | None = None,
) -> Completed:
    """Run argv in its own process group and return what it printed.

    The child gets exactly `env` (nothing inherited) and no terminal. Past `timeout`, or when the
    awaiting task is cancelled, the whole process group is killed. With `check`, a non-zero exit raises
    CommandError carrying the redacted argv and the tail of the output.
    """
    if isinstance(argv, str | bytes):
        raise TypeError("proc.run takes an argv list, never a shell string")
    argv = [str(arg) for arg in argv]
    if not argv:
        raise ValueError("proc.run needs a non-empty argv")
    secrets = list(secrets)
    shown = redact_argv(argv, secrets)
    stdout, stderr = _BoundedBuffer(max_output), _BoundedBuffer(max_output)
    started = time.monotonic()
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            env=dict(env),
            stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        raise CommandError(shown, None, f"command not found: {argv[0]} ({exc.strerror})") from None
    except PermissionError as exc:
        raise CommandError(shown, None, f"cannot execute {argv[0]}: {exc.strerror}") from None
    if on_start is not None:
        on_start(process.pid)

    async def communicate() -> None:
        if input is not None and process.stdin is not None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                process.stdin.write(input)
                await process.stdin.drain()
            process.stdin.close()
        drains = asyncio.gather(_drain(process.stdout, stdout), _drain(process.stderr, stderr))
        drains.add_done_callback(_consume)
        try:
            await _exited(process)
            # Something the command left running in its group may still hold the pipes open.
            _kill_group(process.pid, signal.SIGKILL)
            await drains
            await process.wait()
        finally:
            drains.cancel()

    try:
        await asyncio.wait_for(communicate(), timeout)
    except TimeoutError:
        await _stop(process)
        output = _tail(stdout, stderr, secrets)
        log.warning("command timed out", argv=shown, timeout=timeout)
        raise CommandTimeout(shown, timeout, output) from None
    except BaseException:
        await asyncio.shield(_stop(process))
        raise

    completed = Completed(
        argv=shown,
        returncode=process.returncode if process.returncode is not None else -1,
        stdout=stdout.text(),
        stderr=stderr.text(),
        duration=time.monotonic() - started,
    )
    if check and completed.returncode != 0:
        raise CommandError(shown, completed.returncode, _tail(stdout, stderr, secrets))
    return completed


def _tail(stdout: _BoundedBuffer, stderr: _BoundedBuffer, secrets: Iterable[str], limit: int = 4000) -> str:
    text = "\n".join(part for part in (stdout.text().rstrip(), stderr.text().rstrip()) if part)
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return redact(text[-limit:])
