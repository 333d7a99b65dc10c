"""Housekeeping: the worktree TTL and run retention remove what is old, and never what is in use."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from app.config import Settings
from app.demo.model_server import Script, ScriptedModelServer, ToolCall, Turn
from app.demo.sample import DEMO_TICKET, create_origin, demo_scripts
from app.errors import RunConflict
from app.main import default_runner
from app.models import RunState
from app.pipeline.runner import Runner

pytestmark = pytest.mark.e2e
DAY = 86400


def scripts() -> list[Script]:
    """SHOP-3's implementation sleeps (it stays running); the others follow the demo and fail lint."""
    slow = Script("Ticket SHOP-3:", [Turn(tool_calls=[ToolCall.bash("echo working; sleep 60; echo done")])])
    return [slow, *demo_scripts()]


async def wait_until(runner: Runner, run_id: str, states: set[RunState], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while (await runner.get_run(run_id)).state not in states:
        assert time.monotonic() < deadline, f"{run_id} never reached {states}"
        await asyncio.sleep(0.2)


async def scenario(tmp_path: Path, model_url: str) -> None:
    origin = create_origin(tmp_path / "remote")
    settings = Settings(
        _env_file=None,
        workspace_dir=tmp_path / "workspace",
        repo_url=str(origin),
        base_branch="main",
        anthropic_api_key="dummy-model-key",
        anthropic_base_url=model_url,
        claude_model="claude-sonnet-4-5",
        lint_command="ruff check .",
        test_command="python -m pytest -q",
        run_review=False,
        max_fix_rounds=0,
        queue_poll_interval="0.2s",
        worktree_ttl="7d",
        run_retention_days=30,
    )
    worktrees = settings.workspace_dir / "worktrees" / "ticket"
    sessions = settings.workspace_dir / ".auto-code" / "agent" / "sessions"
    async with default_runner(settings) as runner:
        finished = []
        for key in ("SHOP-1", "SHOP-2"):
            run_id = (await runner.submit(DEMO_TICKET.model_copy(update={"key": key}), None)).run_id
            await wait_until(runner, run_id, {RunState.FAILED})
            finished.append(run_id)
        active = (await runner.submit(DEMO_TICKET.model_copy(update={"key": "SHOP-3"}), None)).run_id
        try:
            await wait_until(runner, active, {RunState.RUNNING})
            while not any(step.name == "implement" for step in (await runner.get_run(active)).steps):
                await asyncio.sleep(0.1)
            await asyncio.sleep(1)  # the agent of SHOP-3 is now running its `sleep`
            assert sorted(p.name for p in worktrees.iterdir()) == ["shop-1", "shop-2", "shop-3"]
            assert len(list(sessions.iterdir())) == 3

            # A day later nothing is old enough.
            assert await runner.housekeeping(now=time.time() + DAY) == {
                "worktrees": 0,
                "runs": 0,
                "agent_state": 0,
            }

            # Forty days later: the failed runs' worktrees, records and transcripts go; SHOP-3's stay.
            removed = await runner.housekeeping(now=time.time() + 40 * DAY)
            assert removed["worktrees"] == 2 and removed["runs"] == 2 and removed["agent_state"] >= 2
            assert sorted(p.name for p in worktrees.iterdir()) == ["shop-3"]
            assert [r.run_id for r in await runner.list_runs()] == [active]
            active_session = next(
                s.output["session_id"]
                for s in (await runner.get_run(active)).steps
                if s.name == "prepare_workspace"
            )
            assert [p.name for p in sessions.iterdir()] == [active_session]
            assert (await runner.get_run(active)).state is RunState.RUNNING
        finally:
            with contextlib.suppress(RunConflict):
                await runner.cancel(active)


def test_ttl_and_retention_remove_only_what_they_should(tmp_path: Path) -> None:
    with ScriptedModelServer(scripts()) as model:
        asyncio.run(scenario(tmp_path, model.base_url))
