"""`auto-code demo`: one sample ticket through the real pipeline, offline, with no keys.

A throwaway origin repository holds a small Python project; the scripted local model plays an agent
that implements the ticket with a lint error and a failing test, then fixes both on its resumed session.
Everything else is the production path: the durable runner on SQLite, the real Claude Code CLI, real
git, the sample's real ruff and pytest, and a push of ticket/shop-1 to the throwaway origin.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

from app import proc
from app.config import Settings
from app.demo.model_server import ScriptedModelServer
from app.demo.sample import DEMO_TICKET, create_origin, demo_scripts
from app.logger import configure_logging
from app.main import default_runner
from app.models import RunState
from app.pipeline.runner import Runner, RunRecord

DEMO_TIMEOUT = 600
FINAL = {
    RunState.PR_OPENED,
    RunState.PUSHED,
    RunState.NO_CHANGES,
    RunState.DRY_RUN,
    RunState.FAILED,
    RunState.CANCELLED,
    RunState.QUARANTINED,
}


def demo_settings(root: Path, origin: Path, model_url: str) -> Settings:
    """Settings that depend on nothing in the caller's environment: no key, no token, no database."""
    return Settings(
        _env_file=None,
        workspace_dir=root / "workspace",
        repo_url=str(origin),
        repo_dir=None,
        base_branch="main",
        anthropic_api_key="demo-placeholder-not-a-key",
        anthropic_base_url=model_url,
        claude_model="claude-sonnet-4-5",
        gh_token=None,
        gh_enterprise_token=None,
        github_repo=None,
        jira_base_url=None,
        database_url=None,
        webhook_secret=None,
        api_token=None,
        lint_command="ruff check .",
        test_command="python -m pytest -q",
        dry_run=False,
        run_review=True,
        run_lint=True,
        run_tests=True,
        max_fix_rounds=2,
        queue_poll_interval="0.2s",
        replica_id="demo",
    )


async def wait_for_end(runner: Runner, run_id: str, out: TextIO, timeout: float = DEMO_TIMEOUT) -> RunRecord:
    """Follow a run, printing each step as it ends, until it reaches a final state."""
    shown = 0
    deadline = time.monotonic() + timeout
    while True:
        record = await runner.get_run(run_id)
        finished = [step for step in record.steps if step.status != "running"]
        for step in finished[shown:]:
            seconds = f"{step.seconds:6.1f}s" if step.seconds is not None else "      "
            print(f"  {step.name:<18} {step.status:<6} {seconds}  {step.summary[:100]}", file=out, flush=True)
        shown = len(finished)
        if record.state in FINAL:
            return record
        if time.monotonic() > deadline:
            raise TimeoutError(f"the demo run did not finish within {timeout:.0f}s")
        await asyncio.sleep(0.3)


def summary(record: RunRecord, origin: Path) -> str:
    """What a newcomer should see at the end: outcome, files, fix rounds, cost, where the branch is."""
    result = record.result
    lines = ["", f"Outcome: {record.state.value}" + (f" ({record.reason})" if record.reason else "")]
    if result is None:
        return "\n".join(lines)
    fixes = [step for step in record.steps if step.name == "fix"]
    lines += [
        f"Files changed: {', '.join(result.files) or '-'} (+{result.insertions} -{result.deletions})",
        f"Fix rounds: {len(fixes)}"
        + (f", all on the resumed agent session {result.session_id}" if fixes else ""),
    ]
    lines += [f"  - {step.summary}" for step in fixes]
    lines.append(f"Gates: {', '.join(f'{g.gate.value} {g.status}' for g in result.gates) or '-'}")
    price = "the CLI's price list; the scripted model charged nothing"
    lines.append(f"Agent turns: {result.turns}, cost: ${result.cost_usd:.4f} ({price})")
    if result.network_summary():
        lines.append(result.network_summary())
    lines += [
        f"  {'allowed' if r.get('allowed') else 'denied'}: {r.get('method')} {r.get('host')}:{r.get('port')}"
        f" ({r.get('rule')}, {r.get('phase')} phase)"
        for r in result.network
    ]
    if result.branch and result.commit:
        lines.append(f"Branch: {result.branch} at {result.commit[:12]} in {origin}")
        lines.append(f"  see it with: git -C {origin} log --stat -1 {result.branch}")
    return "\n".join(lines)


async def _demo(root: Path, out: TextIO) -> int:
    origin = create_origin(root)
    print(f"Sample project pushed to a throwaway origin: {origin}", file=out)
    print(f"Ticket {DEMO_TICKET.key}: {DEMO_TICKET.summary}", file=out, flush=True)
    with ScriptedModelServer(demo_scripts()) as model:
        settings = demo_settings(root, origin, model.base_url)
        async with default_runner(settings) as runner:
            submission = await runner.submit(DEMO_TICKET, None)
            print(f"Run {submission.run_id} queued; steps as they finish:", file=out, flush=True)
            record = await wait_for_end(runner, submission.run_id, out)
    print(summary(record, origin), file=out)
    if record.state is not RunState.PUSHED:
        return 1
    argv = ["git", "-C", str(origin), "rev-parse", "--verify", "--quiet", "refs/heads/ticket/shop-1"]
    branch = await proc.run(argv, cwd=root, env={"PATH": os.environ["PATH"]}, timeout=30, check=False)
    return 0 if branch.returncode == 0 else 1


def run_demo(keep: bool = False, out: TextIO = sys.stdout) -> int:
    """Run the demo in a temporary directory; return the process exit code."""
    configure_logging("WARNING")
    root = Path(tempfile.mkdtemp(prefix="auto-code-demo-"))
    try:
        code = asyncio.run(_demo(root, out))
    finally:
        if keep:
            print(f"\nKept the demo directory: {root}", file=out)
        else:
            shutil.rmtree(root, ignore_errors=True)
    return code
