"""Agent sessions on claude-agent-sdk: implement, review (read-only, fresh), fix (the same session resumed).

Every CLI process starts through a launcher script written for it (it holds names, never values): the
launcher records its pid, becomes the leader of its own process group (so a timeout, a cancel or a
restart after a crash can end it and everything it started), clears the environment down to what the
agent needs, and enters the sandbox when one is configured.

The target repository's own `.claude/` settings are NOT loaded (`setting_sources=[]`): they can define
hooks and permission rules that would run commands outside the service's policy. Its CLAUDE.md is read
by the service and appended to the system prompt instead, so the repository's conventions still reach
the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import shutil
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from claude_agent_sdk import (
    AssistantMessage,
    ClaudeAgentOptions,
    ClaudeSDKClient,
    CLINotFoundError,
    ResultMessage,
    TextBlock,
)
from claude_agent_sdk import ClaudeSDKError as SDKError

from app.agent import prompts as ticket_prompts
from app.agent.guard import AgentPolicy, PolicyConfig, agent_environment, hook_matchers
from app.isolation.fence import AGENT, Enclosure, Fence
from app.logger import get_logger
from app.models import AgentOutcome, AgentResult, ReviewResult, ReviewVerdict, Ticket

log = get_logger(__name__)

PIDFILE = "agent.pid"
LAUNCHER_MARK = "auto-code agent launcher"
KILL_GRACE_SECONDS = 2.0
CLAUDE_MD_LIMIT = 20_000
READ_ONLY_TOOLS = ["Read", "Grep", "Glob", "LS", "Bash"]
NEVER_TOOLS = ["WebFetch", "WebSearch", "NotebookEdit", "Task", "Agent"]
# Variables the SDK adds to the CLI's environment itself; the launcher keeps them.
SDK_VARIABLES = (
    "CLAUDE_CODE_ENTRYPOINT",
    "CLAUDE_AGENT_SDK_VERSION",
    "CLAUDE_CODE_SDK_READS_SESSION_STATE",
    "CLAUDE_AGENT_SDK_CLIENT_APP",
    "CLAUDE_AGENT_SDK_DERIVED_CLIENT_APP",
    "PWD",
)


class ModelAccess(Protocol):
    """Hands each agent phase a short-lived credential for the model API (the local proxy)."""

    @property
    def base_url(self) -> str: ...
    def issue(self) -> str: ...
    def revoke(self, token: str) -> None: ...


@dataclass(frozen=True)
class AgentConfig:
    """Limits, model and where the agent keeps its per-session homes and per-run pidfiles."""

    state_dir: Path
    cli_path: Path | None = None
    model: str | None = None
    max_turns: int = 50
    review_max_turns: int = 10
    phase_timeout: float = 1800
    max_retries: int = 3
    api_timeout_ms: int = 120_000
    anthropic_env: Mapping[str, str] = field(default_factory=dict)
    model_access: ModelAccess | None = None
    passthrough: Sequence[str] = ()
    extra_allowed_commands: frozenset[str] = frozenset()
    allow_ci_config_writes: bool = False
    fence: Fence | None = None
    source_env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))


def bundled_cli() -> Path | None:
    """The Claude Code CLI shipped inside the claude-agent-sdk wheel, if present."""
    import claude_agent_sdk

    candidate = Path(claude_agent_sdk.__file__).parent / "_bundled" / "claude"
    return candidate if candidate.is_file() else None


def parse_review(text: str) -> tuple[ReviewVerdict, str]:
    """(verdict, findings) from a review answer; without a HAS_ISSUES marker the verdict is inconclusive."""
    flags = re.findall(r"HAS_ISSUES\W{0,5}\s*(true|false|yes|no)\b", text, flags=re.IGNORECASE)
    match = re.search(r"FINDINGS\W{0,5}\s*(.*)", text, flags=re.IGNORECASE | re.DOTALL)
    findings = match.group(1).strip() if match else ""
    if not flags:
        return "inconclusive", findings or text.strip()[-4000:]
    has_issues = flags[-1].lower() in ("true", "yes")
    if has_issues and not findings:
        return "inconclusive", "HAS_ISSUES: true without a FINDINGS block"
    return ("has_issues" if has_issues else "passed"), findings


def _alive_group(pgid: int) -> bool:
    """Whether any process of the group still runs (zombies waiting to be reaped do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


def kill_group(pgid: int, grace: float = KILL_GRACE_SECONDS) -> None:
    """SIGTERM a process group, wait up to `grace`, then SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _alive_group(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


@dataclass
class _Collected:
    result: ResultMessage | None = None
    texts: list[str] = field(default_factory=list)
    denials: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Phase:
    """One agent phase as the CLI is started for it: where, which session, what to say, its limits."""

    phase: str
    worktree: Path
    session_id: str
    resume: bool
    prompt: Callable[[], str]
    max_turns: int
    budget_usd: float
    deadline: float
    run_id: str
    read_only: bool


class ClaudeCode:
    """Runs agent phases with the CLI, inside the policy, the scrubbed environment and the limits."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self._cli = config.cli_path or bundled_cli()

    # --- where things live ----------------------------------------------------------------------

    def session_home(self, session_id: str) -> Path:
        """The HOME of one agent session (its CLAUDE_CONFIG_DIR is inside), stable across resumes."""
        return self.config.state_dir / "sessions" / session_id

    def run_dir(self, run_id: str) -> Path:
        return self.config.state_dir / "runs" / run_id

    def transcript_exists(self, session_id: str) -> bool:
        """Whether the CLI has stored this session, so it can be resumed."""
        projects = self.session_home(session_id) / ".claude" / "projects"
        return any(projects.glob(f"*/{session_id}.jsonl"))

    # --- phases ---------------------------------------------------------------------------------

    async def implement(
        self,
        ticket: Ticket,
        worktree: Path,
        *,
        session_id: str,
        budget_usd: float,
        deadline: float,
        run_id: str,
    ) -> AgentResult:
        """Implement the ticket in the worktree; resumes the session if an earlier attempt stored it."""
        resuming = self.transcript_exists(session_id)
        return await self._phase(
            _Phase(
                "implement",
                worktree,
                session_id=session_id,
                resume=resuming,
                prompt=lambda: (
                    ticket_prompts.continue_prompt(ticket)
                    if resuming
                    else ticket_prompts.implement(ticket, worktree)
                ),
                max_turns=self.config.max_turns,
                budget_usd=budget_usd,
                deadline=deadline,
                run_id=run_id,
                read_only=False,
            )
        )

    async def fix(
        self,
        worktree: Path,
        feedback: str,
        *,
        session_id: str,
        budget_usd: float,
        deadline: float,
        run_id: str,
    ) -> AgentResult:
        """Resume the implementation session with review findings or check output to fix."""
        return await self._phase(
            _Phase(
                "fix",
                worktree,
                session_id=session_id,
                resume=self.transcript_exists(session_id),
                prompt=lambda: ticket_prompts.fix(feedback),
                max_turns=self.config.max_turns,
                budget_usd=budget_usd,
                deadline=deadline,
                run_id=run_id,
                read_only=False,
            )
        )

    async def review(
        self, ticket: Ticket, worktree: Path, diff: str, *, budget_usd: float, deadline: float, run_id: str
    ) -> ReviewResult:
        """A fresh, read-only session reviews the uncommitted diff; no marker means inconclusive."""
        result = await self._phase(
            _Phase(
                "review",
                worktree,
                session_id=str(uuid.uuid4()),
                resume=False,
                prompt=lambda: ticket_prompts.review(ticket, diff),
                max_turns=self.config.review_max_turns,
                budget_usd=budget_usd,
                deadline=deadline,
                run_id=run_id,
                read_only=True,
            )
        )
        if not result.ok:
            return ReviewResult(
                verdict="inconclusive", findings=f"review ended: {result.reason}", agent=result
            )
        verdict, findings = parse_review(result.summary)
        return ReviewResult(verdict=verdict, findings=findings, agent=result)

    # --- machinery ------------------------------------------------------------------------------

    def _model_route(self, token: str | None) -> dict[str, str]:
        """Through the proxy, the CLI holds only this phase's token, never the real API key."""
        access = self.config.model_access
        if access is None or token is None:
            return {}
        return {"ANTHROPIC_BASE_URL": access.base_url, "ANTHROPIC_API_KEY": token}

    def _launcher(self, run_id: str, names: Sequence[str], prefix: Sequence[str]) -> Path:
        """Write the script the SDK starts as the CLI: pidfile, own process group, clean env, sandbox."""
        assert self._cli is not None
        run_dir = self.run_dir(run_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        pidfile = run_dir / PIDFILE
        # ${NAME+"NAME=$NAME"} keeps a variable only when it is set, with its value untouched.
        keep = " ".join(f'${{{name}+"{name}=${name}"}}' for name in names)
        command = " ".join(shlex.quote(part) for part in [*prefix, str(self._cli)])
        script = (
            "#!/bin/sh\n"
            f"# {LAUNCHER_MARK}: names only, never values\n"
            f"echo $$ > {shlex.quote(str(pidfile))}\n"
            f'exec setsid env -i {keep} {command} "$@"\n'
        )
        launcher = run_dir / "launch-agent"
        launcher.write_text(script)
        launcher.chmod(0o700)
        return launcher

    def _options(
        self, spec: _Phase, *, denials: list[str], token: str | None, enclosure: Enclosure | None
    ) -> ClaudeAgentOptions:
        phase, worktree, session_id, run_id, read_only = (
            spec.phase, spec.worktree, spec.session_id, spec.run_id, spec.read_only
        )  # fmt: skip
        home = self.session_home(session_id)
        config_dir = home / ".claude"
        config_dir.mkdir(parents=True, exist_ok=True)
        env = agent_environment(
            home=home,
            config_dir=config_dir,
            anthropic={
                **self.config.anthropic_env,
                **self._model_route(token),
                "CLAUDE_CODE_MAX_RETRIES": str(self.config.max_retries),
                "API_TIMEOUT_MS": str(self.config.api_timeout_ms),
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
                "DISABLE_AUTOUPDATER": "1",
            },
            passthrough=self.config.passthrough,
            source=self.config.source_env,
        )
        if enclosure is not None:
            env.update(enclosure.env)  # the bridges' ports, the decoy token
        policy = AgentPolicy(
            PolicyConfig(
                worktree=worktree.resolve(),
                extra_allowed_commands=self.config.extra_allowed_commands,
                allow_ci_config_writes=self.config.allow_ci_config_writes,
                read_only=read_only,
            )
        )

        def on_denial(tool: str, tool_input: Mapping[str, Any], reason: str) -> None:
            denials.append(f"{tool}: {reason}")
            log.warning("agent action denied", run_id=run_id, phase=phase, tool=tool, reason=reason)

        # Names the launcher keeps: what agent_environment built, plus what the SDK itself adds.
        names = sorted({*env, *SDK_VARIABLES})
        names = [name for name in names if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)]
        return ClaudeAgentOptions(
            cwd=str(worktree),
            cli_path=str(self._launcher(run_id, names, enclosure.prefix if enclosure else [])),
            env=env,
            model=self.config.model,
            max_turns=spec.max_turns,
            max_budget_usd=spec.budget_usd,
            permission_mode="default" if read_only else "acceptEdits",
            resume=session_id if spec.resume else None,
            session_id=None if spec.resume else session_id,
            system_prompt={
                "type": "preset",
                "preset": "claude_code",
                "append": ticket_prompts.system_rules(worktree, read_only, _claude_md(worktree)),
            },
            setting_sources=[],
            allowed_tools=READ_ONLY_TOOLS if read_only else [],
            disallowed_tools=[*NEVER_TOOLS, *(["Write", "Edit", "MultiEdit"] if read_only else [])],
            hooks=hook_matchers(policy, on_denial),
        )

    async def _phase(self, spec: _Phase) -> AgentResult:
        """One CLI session, fenced when a fence is configured: what it did and what its network saw."""
        fence = self.config.fence
        if fence is None or self._cli is None or not self._cli.exists():
            return await self._session(spec, enclosure=None)
        home = self.session_home(spec.session_id)
        async with fence.enclose(spec.run_id, AGENT, spec.worktree, home, model=True) as enclosure:
            result = await self._session(spec, enclosure=enclosure)
        return result.model_copy(
            update={"network": enclosure.network, "canaries": enclosure.tripped, "fenced": enclosure.fenced}
        )

    async def _session(self, spec: _Phase, *, enclosure: Enclosure | None) -> AgentResult:
        """One CLI session: connect first (pre-warm), then build the prompt, then run it within the limits."""
        phase, session_id, run_id = spec.phase, spec.session_id, spec.run_id

        def ended(outcome: AgentOutcome, reason: str, collected: _Collected | None = None) -> AgentResult:
            return self._result(session_id, outcome, reason, collected)

        if self._cli is None or not self._cli.exists():
            return ended("cli_missing", "the Claude Code CLI was not found (claude-agent-sdk ships it)")
        if spec.budget_usd <= 0:
            return ended("budget", "the run's budget (MAX_BUDGET_USD) is spent")
        timeout = min(self.config.phase_timeout, spec.deadline - time.time())
        if timeout <= 0:
            return ended("timeout", "the run's time (RUN_TIMEOUT) is up")
        collected = _Collected()
        access = self.config.model_access
        token = access.issue() if access else None
        started = time.monotonic()
        try:
            options = self._options(spec, denials=collected.denials, token=token, enclosure=enclosure)
            log.info(
                "agent phase started", run_id=run_id, phase=phase, session_id=session_id, resume=spec.resume
            )
            async with asyncio.timeout(timeout), self._client(options, run_id) as client:
                await client.query(spec.prompt())
                async for message in client.receive_response():
                    self._collect(message, collected)
        except TimeoutError:
            return ended("timeout", f"{phase} ran past its {timeout:.0f}s limit and was stopped", collected)
        except CLINotFoundError as exc:
            return ended("cli_missing", str(exc))
        except SDKError as exc:
            if collected.result is None:
                return ended("crashed", f"the agent CLI failed: {str(exc)[-1500:]}", collected)
        finally:
            # The CLI's process group is gone by now (the client block ended it): revoke its token.
            if access is not None and token is not None:
                access.revoke(token)
            log.info(
                "agent phase ended", run_id=run_id, phase=phase, seconds=round(time.monotonic() - started, 2)
            )
        return self._classify(session_id, collected)

    @contextlib.asynccontextmanager
    async def _client(self, options: ClaudeAgentOptions, run_id: str) -> AsyncIterator[ClaudeSDKClient]:
        """A connected client whose whole process group is ended however the block exits.

        A normal end disconnects first (the CLI exits on its own), then ends what it left behind; a
        timeout or a cancel ends the process group at once.
        """
        client = ClaudeSDKClient(options)
        pidfile = self.run_dir(run_id) / PIDFILE
        finished = False
        try:
            await client.connect()
            yield client
            finished = True
        finally:
            pid = _read_pid(pidfile)
            if finished:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.disconnect(), 10)
            if pid is not None:
                await asyncio.shield(asyncio.to_thread(kill_group, pid))
                pidfile.unlink(missing_ok=True)
            if not finished:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.disconnect(), 5)

    @staticmethod
    def _collect(message: object, collected: _Collected) -> None:
        if isinstance(message, AssistantMessage):
            text = "".join(block.text for block in message.content if isinstance(block, TextBlock))
            if text.strip():
                collected.texts.append(text.strip())
        elif isinstance(message, ResultMessage):
            collected.result = message

    def _classify(self, session_id: str, collected: _Collected) -> AgentResult:
        result = collected.result
        if result is None:
            return self._result(session_id, "crashed", "the agent ended without a result", collected)
        if result.subtype == "error_max_turns":
            return self._result(
                session_id, "max_turns", f"stopped at the turn limit ({result.num_turns})", collected
            )
        if result.subtype == "error_max_budget_usd":
            cost = result.total_cost_usd or 0.0
            return self._result(
                session_id, "budget", f"stopped at the budget limit (${cost:.2f} spent)", collected
            )
        if result.is_error:
            if result.api_error_status is not None or result.terminal_reason == "api_error":
                status = result.api_error_status
                return self._result(
                    session_id, "api_error", f"the model API failed (status {status})", collected
                )
            errors = "; ".join(result.errors or []) or result.result or result.subtype
            return self._result(session_id, "crashed", f"the agent ended with an error: {errors}", collected)
        return self._result(session_id, "success", "", collected)

    @staticmethod
    def _result(
        session_id: str, outcome: AgentOutcome, reason: str, collected: _Collected | None
    ) -> AgentResult:
        result = collected.result if collected else None
        usage = {
            key: int(value)
            for key, value in ((result.usage or {}) if result else {}).items()
            if isinstance(value, int | float)
        }
        summary = (result.result if result and result.result else "") or (
            collected.texts[-1] if collected and collected.texts else ""
        )
        denials = list(collected.denials) if collected else []
        for denial in (result.permission_denials or []) if result else []:
            name = denial.get("tool_name", "tool") if isinstance(denial, dict) else str(denial)
            if not any(entry.startswith(f"{name}:") for entry in denials):
                denials.append(f"{name}: denied by the CLI")
        return AgentResult(
            session_id=session_id,
            outcome=outcome,
            reason=reason,
            turns=result.num_turns if result else 0,
            cost_usd=result.total_cost_usd or 0.0 if result else 0.0,
            usage=usage,
            summary=summary[-8000:],
            denials=denials,
        )

    # --- after a crash --------------------------------------------------------------------------

    def kill_leftovers(self) -> list[int]:
        """End agent process groups a crashed service left behind (their pidfiles say which)."""
        killed = []
        for pidfile in (self.config.state_dir / "runs").glob(f"*/{PIDFILE}"):
            pid = _read_pid(pidfile)
            if pid is not None and _is_agent(pid):
                kill_group(pid)
                killed.append(pid)
                log.warning("killed agent left by a previous process", pid=pid, run_id=pidfile.parent.name)
            pidfile.unlink(missing_ok=True)
        return killed

    def remove_state_before(self, cutoff: float, keep_runs: set[str], keep_sessions: set[str]) -> int:
        """Remove session homes (transcripts) and run dirs untouched since `cutoff` (epoch seconds),
        except those of the runs and sessions still in use."""
        removed = 0
        for kind, keep in (("sessions", keep_sessions), ("runs", keep_runs)):
            for path in (self.config.state_dir / kind).glob("*"):
                if path.name in keep or (path / PIDFILE).exists() or _newest_mtime(path) >= cutoff:
                    continue
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
        return removed


def _newest_mtime(path: Path) -> float:
    newest = path.stat().st_mtime
    for child in path.rglob("*"):
        with contextlib.suppress(OSError):
            newest = max(newest, child.lstat().st_mtime)
    return newest


def _read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def _is_agent(pid: int) -> bool:
    """Guard against a recycled pid: the process must still be a Claude CLI or our sandbox around it."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return b"claude" in cmdline or b"bwrap" in cmdline


def _claude_md(worktree: Path) -> str:
    try:
        return (worktree / "CLAUDE.md").read_text(errors="replace")[:CLAUDE_MD_LIMIT]
    except OSError:
        return ""
