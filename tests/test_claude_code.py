"""Agent sessions through the real SDK and bundled CLI against the scripted local model server."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.agent.claude_code import AgentConfig, ClaudeCode, parse_review
from app.demo.model_server import HttpError, Script, ScriptedModelServer, Stall, ToolCall, Turn
from app.models import AgentResult, Ticket
from tests.fencing import TcpRelay, make_fence

pytestmark = pytest.mark.e2e

TICKET = Ticket(key="DEMO-1", summary="Write the greeting", description="Create hello.txt", project="DEMO")
SERVICE_SECRETS = {
    "GH_TOKEN": "ghp_service_secret_value_000111",
    "WEBHOOK_SECRET": "webhook-service-secret-222333",
    "API_TOKEN": "api-service-secret-444555",
    "JIRA_API_TOKEN": "jira-service-secret-666777",
    "DATABASE_URL": "postgresql://user:db-secret-888999@127.0.0.1/x",
    "LANGFUSE_SECRET_KEY": "sk-lf-service-secret-101010",
}
IMPLEMENT = "Implement this Jira ticket"
FAR_FUTURE = 4_000_000_000.0


@pytest.fixture
def service_secrets(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The service process holds secrets in its own environment, as it does in production."""
    for name, value in SERVICE_SECRETS.items():
        monkeypatch.setenv(name, value)
    return SERVICE_SECRETS


@pytest.fixture
def worktree(tmp_path: Path) -> Path:
    path = tmp_path / "workspace" / "worktrees" / "ticket" / "demo-1"
    path.mkdir(parents=True)
    (path / "README.md").write_text("# demo\n")
    return path


def server_port(server: ScriptedModelServer) -> int:
    return int(server.base_url.rsplit(":", 1)[1])


def make_agent(
    tmp_path: Path,
    server: ScriptedModelServer,
    *,
    fenced: bool = False,
    **limits: object,
) -> ClaudeCode:
    config = AgentConfig(
        state_dir=tmp_path / "workspace" / ".auto-code" / "agent",
        model="claude-sonnet-4-5",
        anthropic_env={"ANTHROPIC_BASE_URL": server.base_url, "ANTHROPIC_API_KEY": "dummy-model-key"},
        fence=make_fence(tmp_path, model=TcpRelay(server_port(server))) if fenced else None,
        **limits,  # type: ignore[arg-type]
    )
    return ClaudeCode(config)


def implement(
    agent: ClaudeCode, worktree: Path, session_id: str | None = None, budget: float = 5.0
) -> AgentResult:
    return asyncio.run(
        agent.implement(
            TICKET,
            worktree,
            session_id=session_id or str(uuid.uuid4()),
            budget_usd=budget,
            deadline=FAR_FUTURE,
            run_id="run-1",
        )
    )


def test_implement_writes_in_the_worktree_and_reports_session_turns_and_cost(
    tmp_path: Path, worktree: Path
) -> None:
    scripts = [
        Script(IMPLEMENT, [Turn(tool_calls=[ToolCall.write("hello.txt", "hello\n")])], final_text="Wrote it.")
    ]
    with ScriptedModelServer(scripts) as server:
        session = str(uuid.uuid4())
        result = implement(make_agent(tmp_path, server), worktree, session)
    assert result.outcome == "success", result.reason
    assert (worktree / "hello.txt").read_text() == "hello\n"
    assert result.session_id == session
    assert result.turns >= 2
    assert result.cost_usd > 0
    assert result.summary == "Wrote it."
    assert "Write" in server.tools_offered()


def test_a_denied_command_never_runs_and_the_model_gets_the_denial(tmp_path: Path, worktree: Path) -> None:
    marker = tmp_path / "marker"
    command = f"curl http://127.0.0.1:9/ ; touch {marker}"
    scripts = [Script(IMPLEMENT, [Turn(tool_calls=[ToolCall.bash(command)])])]
    with ScriptedModelServer(scripts) as server:
        result = implement(make_agent(tmp_path, server), worktree)
    assert not marker.exists()
    (denied,) = [r for r in server.tool_results("Bash")]
    assert denied.is_error and "curl" in denied.content
    assert any("curl" in entry for entry in result.denials)


def test_fix_resumes_the_same_session_with_its_history(tmp_path: Path, worktree: Path) -> None:
    scripts = [
        Script(IMPLEMENT, [Turn(tool_calls=[ToolCall.write("hello.txt", "helo\n")])]),
        Script(
            "Fix the typo",
            [Turn(tool_calls=[ToolCall.edit("hello.txt", "helo", "hello")])],
            final_text="Fixed.",
        ),
    ]
    with ScriptedModelServer(scripts) as server:
        agent = make_agent(tmp_path, server)
        session = str(uuid.uuid4())
        implement(agent, worktree, session)
        assert agent.transcript_exists(session)
        before = len(server.message_requests)
        fixed = asyncio.run(
            agent.fix(
                worktree,
                "Fix the typo in hello.txt",
                session_id=session,
                budget_usd=5,
                deadline=FAR_FUTURE,
                run_id="r",
            )
        )
        resumed = server.message_requests[before:]
    assert fixed.outcome == "success" and fixed.session_id == session
    assert (worktree / "hello.txt").read_text() == "hello\n"
    history = " ".join(server.conversation_texts(resumed[0]))
    assert "Implement this Jira ticket" in history, "the resumed session did not carry its history"


def test_the_agent_environment_holds_no_service_secret(
    tmp_path: Path, worktree: Path, service_secrets: dict[str, str]
) -> None:
    scripts = [
        Script(IMPLEMENT, [Turn(tool_calls=[ToolCall.bash("env"), ToolCall.bash("cat /proc/self/environ")])])
    ]
    with ScriptedModelServer(scripts) as server:
        implement(make_agent(tmp_path, server), worktree)
    results = server.tool_results("Bash")
    assert len(results) == 2, results
    # `env` runs; reading /proc may be denied by the policy, which is fine: either way no secret shows.
    assert not results[0].is_error and "PATH=" in results[0].content, "env printed nothing: proves nothing"
    seen = " ".join(r.content for r in results)
    for value in service_secrets.values():
        assert value not in seen


PROBE_ALL = """python3 -c "
import glob
names = ('GH_TOKEN=', 'WEBHOOK_SECRET=', 'API_TOKEN=', 'JIRA_API_TOKEN=', 'DATABASE_URL=', 'LANGFUSE_')
read = 0
for path in glob.glob('/proc/[0-9]*/environ'):
    try:
        entries = open(path, 'rb').read().decode(errors='replace').split(chr(0))
    except OSError:
        continue
    read += 1
    print(' '.join(e for e in entries if e.startswith(names)))
print('environments read:', read)
"
"""


@pytest.fixture
def service_process() -> Iterator[dict[str, str]]:
    """A stand-in for the service: a process of this user that started with the secrets in its
    environment (what /proc/<pid>/environ shows; setting os.environ later would not show there)."""
    process = subprocess.Popen(["sleep", "120"], env={"PATH": os.environ["PATH"], **SERVICE_SECRETS})
    yield SERVICE_SECRETS
    process.kill()
    process.wait()


def probe_calls() -> list[ToolCall]:
    return [
        ToolCall.bash("cat /proc/$PPID/environ"),
        ToolCall.bash("cat /proc/1/environ"),
        ToolCall.bash(PROBE_ALL),
    ]


def test_without_isolation_the_probe_would_find_the_secrets(
    tmp_path: Path, worktree: Path, service_process: dict[str, str]
) -> None:
    """The control: the probe below is able to see what isolation has to hide."""
    with ScriptedModelServer([Script(IMPLEMENT, [Turn(tool_calls=probe_calls())])]) as server:
        implement(make_agent(tmp_path, server), worktree)
    seen = " ".join(r.content for r in server.tool_results("Bash"))
    assert service_process["GH_TOKEN"] in seen


def test_code_the_agent_runs_cannot_read_the_service_environment(
    tmp_path: Path, worktree: Path, service_process: dict[str, str]
) -> None:
    with ScriptedModelServer([Script(IMPLEMENT, [Turn(tool_calls=probe_calls())])]) as server:
        implement(make_agent(tmp_path, server, fenced=True), worktree)
    results = server.tool_results("Bash")
    assert len(results) == 3, results
    assert "environments read:" in results[2].content, "the probe did not run: it proves nothing"
    seen = " ".join(r.content for r in results)
    for value in service_process.values():
        assert value not in seen


def test_api_529_ends_as_api_error_within_the_bounded_retries(tmp_path: Path, worktree: Path) -> None:
    with ScriptedModelServer([Script(IMPLEMENT, [])]) as server:
        server.inject(HttpError(529), times=10)
        started = time.monotonic()
        result = implement(make_agent(tmp_path, server, max_retries=1, api_timeout_ms=2000), worktree)
    assert result.outcome == "api_error", result
    assert "529" in result.reason
    assert time.monotonic() - started < 30


def test_a_stalled_stream_ends_as_timeout_and_the_cli_is_gone(tmp_path: Path, worktree: Path) -> None:
    with ScriptedModelServer([Script(IMPLEMENT, [])]) as server:
        server.inject(Stall(seconds=60), times=5)
        agent = make_agent(tmp_path, server, phase_timeout=3)
        started = time.monotonic()
        result = implement(agent, worktree)
        elapsed = time.monotonic() - started
    assert result.outcome == "timeout", result
    assert elapsed < 15
    assert not (agent.run_dir("run-1") / "agent.pid").exists()


def test_a_missing_cli_is_a_clear_cli_missing(tmp_path: Path, worktree: Path) -> None:
    with ScriptedModelServer([]) as server:
        agent = make_agent(tmp_path, server, cli_path=tmp_path / "no-such-claude")
        result = implement(agent, worktree)
    assert result.outcome == "cli_missing"
    assert "not found" in result.reason


def test_max_turns_ends_with_its_own_outcome(tmp_path: Path, worktree: Path) -> None:
    turns = [Turn(tool_calls=[ToolCall.bash(f"echo {n}")]) for n in range(6)]
    with ScriptedModelServer([Script(IMPLEMENT, turns)]) as server:
        result = implement(make_agent(tmp_path, server, max_turns=2), worktree)
    assert result.outcome == "max_turns", result


def test_budget_ends_with_its_own_outcome(tmp_path: Path, worktree: Path) -> None:
    expensive = [Turn(tool_calls=[ToolCall.bash("echo costly")], input_tokens=1_000_000) for _ in range(3)]
    with ScriptedModelServer([Script(IMPLEMENT, expensive)]) as server:
        result = implement(make_agent(tmp_path, server), worktree, budget=0.5)
    assert result.outcome == "budget", result
    assert result.cost_usd > 0.5


def test_a_spent_budget_starts_nothing(tmp_path: Path, worktree: Path) -> None:
    with ScriptedModelServer([Script(IMPLEMENT, [])]) as server:
        result = implement(make_agent(tmp_path, server), worktree, budget=0)
        assert server.message_requests == []
    assert result.outcome == "budget"


def test_review_is_read_only_and_parses_its_verdict(tmp_path: Path, worktree: Path) -> None:
    answer = "Looked at it.\n\nHAS_ISSUES: true\nFINDINGS:\n- hello.txt lacks a newline"
    scripts = [
        Script(
            "Review this uncommitted change",
            [Turn(tool_calls=[ToolCall.write("sneaky.txt", "x")])],
            final_text=answer,
        )
    ]
    with ScriptedModelServer(scripts) as server:
        review = asyncio.run(
            make_agent(tmp_path, server).review(
                TICKET, worktree, "diff --git a/hello.txt", budget_usd=5, deadline=FAR_FUTURE, run_id="r"
            )
        )
    assert not (worktree / "sneaky.txt").exists(), "the review session wrote a file"
    assert review.verdict == "has_issues"
    assert "lacks a newline" in review.findings
    assert "Write" not in server.tools_offered()


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("HAS_ISSUES: false\nFINDINGS:\n- none", "passed"),
        ("**HAS_ISSUES:** TRUE\n**FINDINGS:**\n- bug in x", "has_issues"),
        ("HAS_ISSUES = yes\nFINDINGS: a problem", "has_issues"),
        ("The change looks fine to me.", "inconclusive"),
        ("HAS_ISSUES: true", "inconclusive"),
        ("", "inconclusive"),
        (
            "HAS_ISSUES: true\nFINDINGS:\n- a\n\n(on reflection) HAS_ISSUES: false\nFINDINGS:\n- none",
            "passed",
        ),
    ],
)
def test_parse_review(text: str, verdict: str) -> None:
    assert parse_review(text)[0] == verdict
