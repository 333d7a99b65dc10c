"""Report-back: the run's outcome as a comment on the ticket, over real HTTP to a fake Jira."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from app.integrations.jira import JiraReporter, comment_text
from app.models import RunResult, RunState, StepName, Ticket

TICKET = Ticket(key="PROJ-7", summary="Add a thing", project="PROJ")


class FakeJira:
    """Records comment posts; answers with the status it is told to."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.status = 201
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                fake.posts.append(
                    {"path": self.path, "auth": self.headers["Authorization"], "body": json.loads(body)}
                )
                self.send_response(fake.status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"id": "1"}' if fake.status < 300 else b'{"errorMessages": ["nope"]}')

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def jira() -> Iterator[FakeJira]:
    fake = FakeJira()
    yield fake
    fake.close()


def report(jira: FakeJira, result: RunResult) -> None:
    async def go() -> None:
        async with httpx.AsyncClient() as client:
            await JiraReporter(client, jira.url + "/", "bot@example.com", "jira-api-token").report(
                TICKET, result
            )

    asyncio.run(go())


def test_a_pr_is_announced_on_the_ticket(jira: FakeJira) -> None:
    result = RunResult(
        run_id="proj-7-abc", ticket="PROJ-7", state=RunState.PR_OPENED, pr_url="https://github.com/a/b/pull/3",
        summary="Added the thing.", turns=12, cost_usd=0.4321,
    )  # fmt: skip
    report(jira, result)
    (post,) = jira.posts
    assert post["path"] == "/rest/api/2/issue/PROJ-7/comment"
    assert post["auth"] == "Basic " + base64.b64encode(b"bot@example.com:jira-api-token").decode()
    body = post["body"]["body"]
    assert "pr opened" in body and "https://github.com/a/b/pull/3" in body
    assert "Added the thing." in body and "$0.43" in body


def test_a_failure_says_which_step_and_why(jira: FakeJira) -> None:
    result = RunResult(
        run_id="r", ticket="PROJ-7", state=RunState.FAILED, failed_step=StepName.TEST,
        reason="test still failing after 2 fix rounds: FAILED tests/test_x.py::test_y",
    )  # fmt: skip
    report(jira, result)
    body = jira.posts[0]["body"]["body"]
    assert "failed" in body and "Failed at: test" in body and "tests/test_x.py::test_y" in body


def test_a_quarantined_run_says_why_with_the_evidence_and_the_network_record(jira: FakeJira) -> None:
    denied = {"phase": "agent", "method": "CONNECT", "host": "evil.test", "port": 443, "allowed": False}
    result = RunResult(
        run_id="r", ticket="PROJ-7", state=RunState.QUARANTINED, failed_step=StepName.COMMIT,
        reason="quarantined at commit: a decoy credential is in the change; nothing was committed",
        evidence=["the file notes.txt: GITHUB_TOKEN"], fenced=True,
        network=[{**denied, "rule": "not in the agent allowlist"}],
    )  # fmt: skip
    report(jira, result)
    body = jira.posts[0]["body"]["body"]
    assert "auto-code run r: quarantined" in body and "Failed at: commit" in body
    assert "Reason: quarantined at commit: a decoy credential" in body
    assert "Evidence: the file notes.txt: GITHUB_TOKEN" in body
    assert "Network: fenced; 0 requests" in body
    assert "1 connection denied: evil.test:443 (not in the agent allowlist, agent)" in body


def test_an_unfenced_run_says_so_on_the_ticket(jira: FakeJira) -> None:
    report(jira, RunResult(run_id="r", ticket="PROJ-7", state=RunState.NO_CHANGES, fenced=False))
    assert "Network: UNFENCED" in jira.posts[0]["body"]["body"]


def test_jira_refusing_the_comment_raises_for_the_caller_to_log(jira: FakeJira) -> None:
    jira.status = 400
    with pytest.raises(RuntimeError, match="Jira answered 400"):
        report(jira, RunResult(run_id="r", ticket="PROJ-7", state=RunState.NO_CHANGES))


def test_a_dry_run_comment_carries_the_removal_hint() -> None:
    result = RunResult(
        run_id="r",
        ticket="PROJ-7",
        state=RunState.DRY_RUN,
        removal_hint="git -C /w/repo worktree remove /w/x --force",
    )
    assert "worktree remove /w/x --force" in comment_text(result)
