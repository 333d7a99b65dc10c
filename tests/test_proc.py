"""proc.run: argv only, explicit environment, bounded output, timeouts that kill the whole group."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest

from app import proc
from app.errors import CommandError, CommandTimeout
from app.logger import register_secrets

ENV = {"PATH": os.environ["PATH"]}


def run(*args: object, **kwargs: object) -> proc.Completed:
    return asyncio.run(proc.run(*args, **kwargs))  # type: ignore[arg-type]


def test_rejects_a_shell_string(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="argv list"):
        run("echo hi", cwd=tmp_path, env=ENV, timeout=5)


def test_captures_output_in_cwd_with_only_the_given_environment(tmp_path: Path) -> None:
    os.environ["AUTO_CODE_PROC_LEAK"] = "should-not-pass"
    try:
        done = run(["sh", "-c", "pwd; env"], cwd=tmp_path, env={**ENV, "ONLY": "this"}, timeout=5)
    finally:
        del os.environ["AUTO_CODE_PROC_LEAK"]
    assert done.returncode == 0
    assert done.stdout.splitlines()[0] == str(tmp_path)
    assert "ONLY=this" in done.stdout
    assert "AUTO_CODE_PROC_LEAK" not in done.stdout


def test_failure_raises_with_redacted_argv_and_output_tail(tmp_path: Path) -> None:
    register_secrets(["registered-secret-value"])
    with pytest.raises(CommandError) as info:
        run(
            [
                "sh",
                "-c",
                "echo out-line; echo err-line >&2; exit 3",
                "given-secret-value",
                "registered-secret-value",
            ],
            cwd=tmp_path,
            env=ENV,
            timeout=5,
            secrets=["given-secret-value"],
        )
    error = info.value
    assert error.returncode == 3
    assert "out-line" in error.output and "err-line" in error.output
    assert "given-secret-value" not in str(error) and "registered-secret-value" not in str(error)
    assert "[redacted]" in error.argv


def test_check_false_returns_the_exit_code(tmp_path: Path) -> None:
    assert run(["sh", "-c", "exit 7"], cwd=tmp_path, env=ENV, timeout=5, check=False).returncode == 7


def test_missing_binary_is_a_command_error(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="command not found"):
        run(["definitely-not-a-binary-xyz"], cwd=tmp_path, env=ENV, timeout=5)


def test_output_is_bounded_keeping_head_and_tail(tmp_path: Path) -> None:
    script = "import sys; sys.stdout.write('HEAD' + 'x' * 500000 + 'TAIL')"
    done = run([sys.executable, "-c", script], cwd=tmp_path, env=ENV, timeout=10, max_output=1000)
    assert done.stdout.startswith("HEAD") and done.stdout.endswith("TAIL")
    assert "bytes dropped" in done.stdout
    assert len(done.stdout) < 1200


def test_stdin_is_fed(tmp_path: Path) -> None:
    assert run(["cat"], cwd=tmp_path, env=ENV, timeout=5, input=b"fed").stdout == "fed"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    started = time.monotonic()
    with pytest.raises(CommandTimeout) as info:
        run(
            ["sh", "-c", f"sleep 60 & echo $! > {pidfile}; echo started; wait"],
            cwd=tmp_path,
            env=ENV,
            timeout=1,
        )
    assert time.monotonic() - started < 6
    assert "started" in info.value.output
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 3
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the grandchild survived the timeout"


def test_cancellation_kills_the_process_group(tmp_path: Path) -> None:
    pids: list[int] = []

    async def scenario() -> None:
        task = asyncio.create_task(
            proc.run(["sleep", "60"], cwd=tmp_path, env=ENV, timeout=60, on_start=pids.append)
        )
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert pids and not _alive(pids[0])


def test_a_left_behind_daemon_does_not_hang_the_call(tmp_path: Path) -> None:
    started = time.monotonic()
    done = run(["sh", "-c", "sleep 30 & echo parent-done"], cwd=tmp_path, env=ENV, timeout=20)
    assert done.stdout.strip() == "parent-done"
    assert time.monotonic() - started < 5
