"""The pipeline end to end: webhook over real HTTP to a PR opened by the real gh on a fake GitHub."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.demo.model_server import Script, ToolCall, Turn
from app.demo.sample import IMPLEMENT_TRIGGER, LINT_FIX_TRIGGER, TEST_FIX_TRIGGER, demo_scripts
from tests.pipeline import GITHUB_TOKEN, Stack, session_of, ticket_body

pytestmark = pytest.mark.e2e


def test_webhook_to_pull_request(tmp_path: Path) -> None:
    with Stack(tmp_path, demo_scripts()) as stack:
        service = stack.service()
        accepted = service.post_ticket(ticket_body(), delivery="delivery-1")
        assert accepted["status"] == "accepted"
        run = service.wait_for(accepted["run_id"])

        assert run["state"] == "pr_opened", run
        head = stack.origin_branch("ticket/shop-1")
        assert head is not None and head == run["result"]["commit"]
        assert {"shop/slug.py", "tests/test_slug.py"} <= set(stack.origin_files("ticket/shop-1"))
        (pull,) = stack.github.pulls
        assert run["pr_url"] == stack.github.url("acme/widgets", pull.number)
        assert pull.title == "SHOP-1: Add a slugify helper for product names"
        assert "SHOP-1" in pull.body and "lint" in pull.body
        assert stack.github.operations().count("PullRequestCreate") == 1
        assert all(
            request.authorization in (None, f"token {GITHUB_TOKEN}") for request in stack.github.requests
        )
        # Both fixes went to the implementation session, which the model saw resumed with its history.
        session = run["result"]["session_id"]
        fixes = [step for step in run["steps"] if step["name"] == "fix"]
        assert len(fixes) == 2
        assert [s["name"] for s in run["steps"]][:2] == ["prepare_workspace", "implement"]
        for trigger in (LINT_FIX_TRIGGER, TEST_FIX_TRIGGER):
            requests = stack.model_requests(trigger)
            assert requests and {session_of(request) for request in requests} == {session}
            assert IMPLEMENT_TRIGGER in " ".join(stack.model.conversation_texts(requests[0]))


def test_the_agent_never_holds_the_anthropic_key(tmp_path: Path) -> None:
    real_key = "sk-ant-pipeline-real-key-0123456789"
    scripts = [
        Script(
            IMPLEMENT_TRIGGER,
            [Turn(tool_calls=[ToolCall.bash("env"), ToolCall.write("NOTES.md", "notes\n")])],
            final_text="Wrote notes.",
        )
    ]
    settings = {
        "ANTHROPIC_API_KEY": real_key,
        "RUN_REVIEW": "false",
        "RUN_LINT": "false",
        "RUN_TESTS": "false",
    }
    with Stack(tmp_path, scripts, settings=settings) as stack:
        service = stack.service()
        run = service.wait_for(service.post_ticket(ticket_body())["run_id"])
        assert run["state"] == "pr_opened", run
        (env_output,) = [r.content for r in stack.model.tool_results("Bash")]
        assert "ANTHROPIC_API_KEY=" in env_output, "env printed no key at all: the check proves nothing"
        assert real_key not in env_output
        # Every request reached the model with the real key: the proxy swapped the phase token for it.
        assert {request.headers.get("x-api-key") for request in stack.model.message_requests} == {real_key}
