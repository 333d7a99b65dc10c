"""The gates end to end: review, lint and test findings go back to the same agent session, and every
way a run can end (PR, failed after the fix rounds, DRY_RUN, no changes, a failure the base already has).

Each test drives the real service (`python -m app`), the real CLI against the scripted model server, git
and gh against a fake GitHub, and asserts on what they recorded: origin branches, pulls, model requests
and the run record from the runs API.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from app.demo.model_server import Conversation, Script, ToolCall, Turn, prompt_texts
from app.demo.sample import (
    IMPLEMENT_TRIGGER,
    LINT_FIX_TRIGGER,
    REVIEW_TRIGGER,
    SAMPLE_FILES,
    SLUG_TEST,
    SLUG_WITH_PROBLEMS,
    TEST_FIX_TRIGGER,
    demo_scripts,
)
from tests.pipeline import Stack, latest_prompt, session_of, step_names, ticket_body

pytestmark = pytest.mark.e2e

BRANCH = "ticket/shop-1"
REVIEW_FIX_TRIGGER = "A code review of your change found these issues"
# The sample's slug module without the unused import: lint passes, the '_' separator is the bug.
SLUG_WRONG_SEPARATOR = SLUG_WITH_PROBLEMS.replace("import os\n\n\n", "")
SLUG_RIGHT = SLUG_WRONG_SEPARATOR.replace('"_".join', '"-".join')
FINDING = "shop/slug.py: slugify joins words with '_' but the ticket asks for '-'; join them with '-'."
NO_GATES = {"RUN_REVIEW": "false", "RUN_LINT": "false", "RUN_TESTS": "false"}


def _implement(*files: tuple[str, str], summary: str = "Added the slug helper.") -> Script:
    """An implementation that writes `files`, one turn each."""
    turns = [Turn(tool_calls=[ToolCall.write(path, content)]) for path, content in files]
    return Script(IMPLEMENT_TRIGGER, turns, final_text=summary)


def _review_answer(messages: Conversation) -> str:
    """The reviewer's verdict, decided by the diff in the review prompt (a review is a fresh session)."""
    prompt = "\n".join(prompt_texts(messages[0])) if messages else ""
    if '"_".join' in prompt:
        return f"One problem.\n\nHAS_ISSUES: true\nFINDINGS:\n- {FINDING}"
    return "Looks right now.\n\nHAS_ISSUES: false\nFINDINGS:\n- none"


def test_review_findings_resume_the_implementation_session(tmp_path: Path) -> None:
    scripts = [
        _implement(("shop/slug.py", SLUG_WRONG_SEPARATOR)),
        Script(REVIEW_TRIGGER, [Turn(text=_review_answer)]),
        Script(
            REVIEW_FIX_TRIGGER,
            [Turn(tool_calls=[ToolCall.edit("shop/slug.py", '"_".join', '"-".join')])],
            final_text="Slugs now join words with '-' as the review asked.",
        ),
    ]
    with Stack(tmp_path, scripts, settings={"RUN_TESTS": "false"}) as stack:
        service = stack.service()
        run = service.wait_for(service.post_ticket(ticket_body())["run_id"])

        assert run["state"] == "pr_opened", run
        assert step_names(run) == [
            "prepare_workspace", "implement", "review", "fix", "review", "lint",
            "commit", "push", "open_pr", "report",
        ]  # fmt: skip
        assert [step["status"] for step in run["steps"][2:5]] == ["has_issues", "ok", "passed"]
        session = run["result"]["session_id"]

        (fix,) = stack.model_requests(REVIEW_FIX_TRIGGER, turn=0)
        assert session_of(fix) == session, "the fix must resume the implementation session"
        history = "\n".join(stack.model.conversation_texts(fix))
        assert IMPLEMENT_TRIGGER in history, "the fix request lacks the implementation's history"
        assert FINDING in latest_prompt(fix)
        reviews = stack.model_requests(REVIEW_TRIGGER, turn=0)
        assert len(reviews) == 2
        review_sessions = {session_of(request) for request in reviews}
        assert len(review_sessions) == 2 and session not in review_sessions, "reviews are fresh sessions"

        assert run["result"]["review_findings"] == [FINDING]
        (pull,) = stack.github.pulls
        assert FINDING in pull.body
        assert stack.origin_branch(BRANCH) == run["result"]["commit"]
        shown = subprocess.run(
            ["git", "-C", str(stack.origin), "show", f"{BRANCH}:shop/slug.py"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert shown.stdout == SLUG_RIGHT


def test_lint_and_test_failures_resume_the_session_and_lint_runs_again(tmp_path: Path) -> None:
    with Stack(tmp_path, demo_scripts(), settings={"RUN_REVIEW": "false"}) as stack:
        service = stack.service()
        run = service.wait_for(service.post_ticket(ticket_body())["run_id"])

        assert run["state"] == "pr_opened", run
        # After each fix every gate runs again from the first: the test fix is followed by lint.
        assert [(step["name"], step["status"]) for step in run["steps"]] == [
            ("prepare_workspace", "ok"), ("implement", "ok"),
            ("lint", "failed"), ("baseline", "passed"), ("fix", "ok"),
            ("lint", "passed"), ("test", "failed"), ("baseline", "passed"), ("fix", "ok"),
            ("lint", "passed"), ("test", "passed"),
            ("commit", "ok"), ("push", "ok"), ("open_pr", "ok"), ("report", "ok"),
        ]  # fmt: skip
        session = run["result"]["session_id"]

        (lint_fix,) = stack.model_requests(LINT_FIX_TRIGGER, turn=0)
        (test_fix,) = stack.model_requests(TEST_FIX_TRIGGER, turn=0)
        assert session_of(lint_fix) == session_of(test_fix) == session
        lint_history = "\n".join(stack.model.conversation_texts(lint_fix))
        assert IMPLEMENT_TRIGGER in lint_history
        assert "F401" in latest_prompt(lint_fix) and "`os` imported but unused" in latest_prompt(lint_fix)
        test_history = "\n".join(stack.model.conversation_texts(test_fix))
        assert IMPLEMENT_TRIGGER in test_history and LINT_FIX_TRIGGER in test_history
        assert "FAILED tests/test_slug.py::test_slugify" in latest_prompt(test_fix)
        assert "blue_suede_shoes" in latest_prompt(test_fix)

        gates = {gate["gate"]: gate for gate in run["result"]["gates"]}
        assert gates["lint"]["rounds"] == 1 and gates["test"]["rounds"] == 1
        (pull,) = stack.github.pulls
        assert "**lint**: passed" in pull.body and "**test**: passed" in pull.body


def test_a_gate_still_failing_after_the_fix_rounds_fails_the_run(tmp_path: Path) -> None:
    scripts = [
        _implement(("shop/slug.py", SLUG_WRONG_SEPARATOR), ("tests/test_slug.py", SLUG_TEST)),
        # The "fix" changes nothing: the test keeps failing.
        Script(TEST_FIX_TRIGGER, [], final_text="I checked the code and it looks right to me."),
    ]
    settings = {"RUN_REVIEW": "false", "RUN_LINT": "false", "MAX_FIX_ROUNDS": "1"}
    with Stack(tmp_path, scripts, settings=settings) as stack:
        service = stack.service()
        run = service.wait_for(service.post_ticket(ticket_body())["run_id"])

        assert run["state"] == "failed", run
        result = run["result"]
        assert result["failed_step"] == "test"
        assert "test still failing after 1 fix rounds" in run["reason"]
        assert "FAILED tests/test_slug.py::test_slugify" in run["reason"]
        assert step_names(run) == [
            "prepare_workspace",
            "implement",
            "test",
            "baseline",
            "fix",
            "test",
            "report",
        ]
        assert len(stack.model_requests(TEST_FIX_TRIGGER, turn=0)) == 1
        assert stack.github.pulls == []
        assert "PullRequestCreate" not in stack.github.operations()
        assert stack.origin_branches() == ["main"]
        assert Path(result["worktree"], "shop/slug.py").is_file(), "a failed run keeps its worktree"


def test_dry_run_keeps_the_worktree_and_opens_no_pr(tmp_path: Path) -> None:
    scripts = [_implement(("shop/slug.py", SLUG_RIGHT))]
    settings = {"DRY_RUN": "true", "RUN_REVIEW": "false", "RUN_TESTS": "false"}
    with Stack(tmp_path, scripts, settings=settings) as stack:
        service = stack.service()
        run = service.wait_for(service.post_ticket(ticket_body())["run_id"])

        assert run["state"] == "dry_run", run
        assert step_names(run) == ["prepare_workspace", "implement", "lint", "report"]
        worktree = Path(run["result"]["worktree"])
        assert (worktree / "shop/slug.py").read_text() == SLUG_RIGHT
        assert stack.origin_branches() == ["main"]
        assert stack.github.pulls == [] and stack.github.requests == []

        hint = run["result"]["removal_hint"]
        removed = subprocess.run(shlex.split(hint), capture_output=True, text=True, check=False)
        assert removed.returncode == 0, removed.stderr
        assert not worktree.exists()
        clone = Path(shlex.split(hint)[2])
        listed = subprocess.run(
            ["git", "-C", str(clone), "worktree", "list", "--porcelain"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert str(worktree) not in listed.stdout


def test_an_implementation_that_changes_nothing_ends_with_no_changes(tmp_path: Path) -> None:
    scripts = [
        Script(
            IMPLEMENT_TRIGGER,
            [Turn(tool_calls=[ToolCall.read("README.md")])],
            final_text="The repository already does what the ticket asks; nothing to change.",
        )
    ]
    with Stack(tmp_path, scripts, settings=NO_GATES) as stack:
        service = stack.service()
        run = service.wait_for(service.post_ticket(ticket_body())["run_id"])

        assert run["state"] == "no_changes", run
        assert step_names(run) == ["prepare_workspace", "implement", "report"]
        assert run["result"]["commit"] is None
        assert stack.origin_branches() == ["main"]
        assert stack.github.pulls == [] and stack.github.requests == []
        assert not Path(run["result"]["worktree"]).exists(), "a run with nothing to show removes its worktree"


LEGACY_TEST = (
    "from shop.prices import total\n\n\ndef test_legacy_discount_rounding() -> None:\n"
    "    assert total([10.0], discount=0.1) == 9.5\n"
)
LEGACY_FAILURE = "FAILED tests/test_legacy.py::test_legacy_discount_rounding"


def test_a_failure_the_base_already_has_is_reported_not_fed_back(tmp_path: Path) -> None:
    broken_base = {**SAMPLE_FILES, "tests/test_legacy.py": LEGACY_TEST}
    scripts = [
        _implement(("shop/slug.py", SLUG_RIGHT), ("tests/test_slug.py", SLUG_TEST)),
        Script(TEST_FIX_TRIGGER, [], final_text="(must not be asked)"),
    ]
    settings = {"RUN_REVIEW": "false"}
    with Stack(tmp_path, scripts, settings=settings, sample_files=broken_base) as stack:
        service = stack.service()
        run = service.wait_for(service.post_ticket(ticket_body())["run_id"])

        assert run["state"] == "pr_opened", run
        assert step_names(run) == [
            "prepare_workspace", "implement", "lint", "test", "baseline",
            "commit", "push", "open_pr", "report",
        ]  # fmt: skip
        assert [run["steps"][3]["status"], run["steps"][4]["status"]] == ["failed", "failed"]
        (test_gate,) = [gate for gate in run["result"]["gates"] if gate["gate"] == "test"]
        assert test_gate["status"] == "failing on base"
        assert LEGACY_FAILURE in test_gate["preexisting"]
        (pull,) = stack.github.pulls
        assert "already failing on the base branch" in pull.body
        assert LEGACY_FAILURE in pull.body
        assert stack.model_requests(TEST_FIX_TRIGGER) == []
        for request in stack.model.message_requests:
            assert "test_legacy_discount_rounding" not in str(request.body), (
                "the agent saw the base's failure"
            )
