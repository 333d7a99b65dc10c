"""Durability end to end: duplicate deliveries make one run, the queue's limit holds (also across two
replicas on PostgreSQL), and a kill -9 mid-implementation resumes the same agent session to one PR.

Concurrency is measured, not assumed: a sampler thread counts the agent CLI processes in /proc.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from app.demo.model_server import Script, ToolCall, Turn
from app.demo.sample import IMPLEMENT_TRIGGER
from app.models import StepName
from app.pipeline import workflow
from tests.conftest import in_ci
from tests.pipeline import (
    Service,
    Stack,
    log_lines,
    postgres_database,
    postgres_problem,
    session_of,
    step_names,
    ticket_body,
)
from tests.sampling import AgentSampler

NO_GATES = {"RUN_REVIEW": "false", "RUN_LINT": "false", "RUN_TESTS": "false"}
CONTINUE_TRIGGER = "The service was interrupted while you were implementing"


def _one_file_implementation() -> Script:
    """The smallest useful change: one new file, two model turns."""
    return Script(
        IMPLEMENT_TRIGGER,
        [Turn(tool_calls=[ToolCall.write("shop/feature.py", '"""A feature."""\n\nENABLED = True\n')])],
        final_text="Added shop/feature.py.",
    )


def _service_pids(stack: Stack) -> set[int]:
    return {service.process.pid for service in stack.services if service.process is not None}


def _post_all(
    service: Service, requests: Sequence[tuple[dict[str, Any], str | None]]
) -> list[dict[str, Any]]:
    """POST every (body, delivery id) from its own thread, all released at the same moment."""
    answers: list[dict[str, Any]] = [{} for _ in requests]
    barrier = threading.Barrier(len(requests))

    def post(index: int) -> None:
        body, delivery = requests[index]
        barrier.wait()
        answers[index] = service.post_ticket(body, delivery, expect=None)

    threads = [threading.Thread(target=post, args=(index,)) for index in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return answers


# --- duplicates -------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_twenty_concurrent_duplicate_deliveries_make_one_run_and_one_pr(tmp_path: Path) -> None:
    with Stack(tmp_path, [_one_file_implementation()], settings=NO_GATES) as stack:
        service = stack.service()
        body = ticket_body()
        # Jira's retries of one delivery, deliveries of duplicate rules, and bodies with no delivery id.
        requests = (
            [(body, "delivery-retried")] * 8
            + [(body, f"delivery-{index}") for index in range(6)]
            + [(body, None)] * 6
        )
        answers = _post_all(service, requests)

        assert [answer["http_status"] for answer in answers] == [202] * 20, answers
        run_ids = {answer["run_id"] for answer in answers}
        assert len(run_ids) == 1, answers
        statuses = [answer["status"] for answer in answers]
        assert statuses.count("accepted") == 1, list(zip([d for _, d in requests], statuses, strict=True))
        assert statuses.count("duplicate") == 19, statuses

        (run_id,) = run_ids
        run = service.wait_for(run_id)
        assert run["state"] == "pr_opened", run
        listed = service.api("GET", "/runs", params={"ticket": "SHOP-1"}).json()["runs"]
        assert [item["run_id"] for item in listed] == [run_id]
        assert len(stack.github.pulls) == 1
        assert stack.github.operations().count("PullRequestCreate") == 1
        assert len(stack.model_requests(IMPLEMENT_TRIGGER, turn=0)) == 1


# --- the concurrency limit ----------------------------------------------------------------------------


def _overlap(runs: list[dict[str, Any]], step: str) -> int:
    """The most `step`s the run records show running at the same moment."""
    events = []
    for run in runs:
        for record in run["steps"]:
            if record["name"] == step and record["started_at"] and record["ended_at"]:
                events += [(record["started_at"], 1), (record["ended_at"], -1)]
    peak = current = 0
    for _, change in sorted(events, key=lambda event: (event[0], event[1])):
        current += change
        peak = max(peak, current)
    return peak


@pytest.mark.e2e
def test_ten_tickets_never_run_more_than_the_limit_of_agents(tmp_path: Path) -> None:
    keys = [f"SHOP-{number}" for number in range(1, 11)]
    settings = {**NO_GATES, "MAX_CONCURRENT_TICKETS": "2"}
    with Stack(tmp_path, [_one_file_implementation()], settings=settings) as stack:
        service = stack.service()
        with AgentSampler(lambda: _service_pids(stack)) as sampler:
            run_ids = [service.post_ticket(ticket_body(key))["run_id"] for key in keys]
            runs = [service.wait_for(run_id, timeout=240) for run_id in run_ids]

        assert [run["state"] for run in runs] == ["pr_opened"] * 10, [run["reason"] for run in runs]
        assert sampler.samples > 100
        assert sampler.peak <= 2, f"{sampler.peak} agents ran at once with MAX_CONCURRENT_TICKETS=2"
        assert sampler.peak == 2, "the limit was never reached, so this test could not have failed"
        assert _overlap(runs, "implement") <= 2
        assert len(stack.github.pulls) == 10
        assert stack.origin_branches() == ["main", *sorted(f"ticket/{key.lower()}" for key in keys)]


# --- kill -9 and restart ------------------------------------------------------------------------------


def _gone(pid: int) -> bool:
    """True when `pid` no longer runs (a zombie waiting for a reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X")


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.e2e
@pytest.mark.parametrize("sandbox", ["off", "auto"])
def test_kill_9_during_implement_resumes_the_same_session_to_one_pr(tmp_path: Path, sandbox: str) -> None:
    scripts = [
        Script(
            IMPLEMENT_TRIGGER,
            [
                Turn(tool_calls=[ToolCall.write("shop/first.py", '"""First half."""\n')]),
                # Long enough to be killed in; a startup that leaves the agent alive would let it go on.
                Turn(tool_calls=[ToolCall.bash("echo working; sleep 60; echo done", "Work slowly")]),
                Turn(tool_calls=[ToolCall.write("shop/late.py", '"""Written by a leftover agent."""\n')]),
            ],
            final_text="Finished before the crash (must not happen).",
        ),
        Script(
            CONTINUE_TRIGGER,
            [Turn(tool_calls=[ToolCall.write("shop/second.py", '"""Second half."""\n')])],
            final_text="Finished the implementation after the restart.",
        ),
    ]
    with Stack(tmp_path, scripts, settings={**NO_GATES, "SANDBOX": sandbox}) as stack:
        first = stack.service()
        run_id = first.post_ticket(ticket_body(), delivery="delivery-1")["run_id"]
        _wait(lambda: stack.model_requests(IMPLEMENT_TRIGGER, turn=1), 60, "the slow command")
        pidfile = stack.workspace / ".auto-code" / "agent" / "runs" / run_id / "agent.pid"
        _wait(pidfile.exists, 10, "the agent's pidfile")
        agent_pid = int(pidfile.read_text())
        time.sleep(1.0)  # the command is running now
        (started,) = [line for line in log_lines(first) if line.get("message") == "agent phase started"]
        session = started["session_id"]
        assert started["resume"] is False

        first.kill()
        first_log = len(first.logs())
        if sandbox == "off":
            # Nothing ends an unsandboxed agent with the service: only the next start can.
            time.sleep(0.5)
            assert not _gone(agent_pid), "the agent should have outlived the killed service"

        second = stack.service(port=first.port)
        assert _gone(agent_pid), "the agent left by the killed service still runs after the restart"
        run = second.wait_for(run_id)

        assert run["state"] == "pr_opened", run
        assert run["result"]["session_id"] == session
        assert step_names(run) == ["prepare_workspace", "implement", "commit", "push", "open_pr", "report"]
        restart_log = log_lines(second, since=first_log)
        restarted = [line for line in restart_log if line.get("message") == "agent phase started"]
        assert [(line["phase"], line["session_id"], line["resume"]) for line in restarted] == [
            ("implement", session, True)
        ]
        if sandbox == "off":
            killed = [
                line
                for line in restart_log
                if line.get("message") == "killed agent left by a previous process"
            ]
            assert [line["pid"] for line in killed] == [agent_pid]

        (resumed,) = stack.model_requests(CONTINUE_TRIGGER, turn=0)
        assert session_of(resumed) == session
        history = "\n".join(stack.model.conversation_texts(resumed))
        assert IMPLEMENT_TRIGGER in history, "the resumed session lacks the first attempt's history"
        assert "sleep 60" in str(resumed.messages), "the first attempt's tool call is not in the history"
        assert stack.model_requests(IMPLEMENT_TRIGGER, turn=2) == [], "the first attempt went on"

        assert stack.origin_branches() == ["main", "ticket/shop-1"]
        files = stack.origin_files("ticket/shop-1")
        assert "shop/first.py" in files and "shop/second.py" in files and "shop/late.py" not in files
        assert len(stack.github.pulls) == 1
        assert stack.github.operations().count("PullRequestCreate") == 1


# --- two replicas on PostgreSQL -------------------------------------------------------------------------


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A database of its own on 127.0.0.1:5432; without PostgreSQL it skips, except under CI (fails)."""
    problem = postgres_problem()
    if problem is not None:
        if in_ci():
            pytest.fail(f"CI needs PostgreSQL on 127.0.0.1:5432: {problem}")
        print(f"skipping: {problem}")
        pytest.skip(problem)
    with postgres_database() as url:
        yield url


@pytest.mark.e2e
@pytest.mark.postgres
def test_two_replicas_share_the_queue_within_the_global_limit(tmp_path: Path, postgres_url: str) -> None:
    keys = [f"SHOP-{number}" for number in range(1, 7)]
    # Each replica may hold one run, so reaching the global limit of two needs both of them.
    settings = {
        **NO_GATES,
        "MAX_CONCURRENT_TICKETS": "2",
        "REPLICA_CONCURRENCY": "1",
        "DATABASE_URL": postgres_url,
    }
    with Stack(tmp_path, [_one_file_implementation()], settings=settings) as stack:
        replicas = [
            stack.service(REPLICA_ID=name, WORKSPACE_DIR=str(tmp_path / f"workspace-{name}"))
            for name in ("replica-a", "replica-b")
        ]
        with AgentSampler(lambda: _service_pids(stack)) as sampler:
            run_ids = [
                replicas[index % 2].post_ticket(ticket_body(key))["run_id"] for index, key in enumerate(keys)
            ]
            runs = [replicas[0].wait_for(run_id, timeout=240) for run_id in run_ids]

        assert [run["state"] for run in runs] == ["pr_opened"] * 6, [run["reason"] for run in runs]
        assert sampler.peak <= 2, f"{sampler.peak} agents ran at once across replicas with a limit of 2"
        assert sampler.peak == 2, "the limit was never reached, so this test could not have failed"
        assert {run["replica"] for run in runs} == {"replica-a", "replica-b"}, "one replica did all the work"
        assert len(stack.github.pulls) == 6


# --- the recorded workflow ------------------------------------------------------------------------------


def test_the_workflow_step_names_and_version_are_pinned() -> None:
    message = (
        "The step names, their order and the workflow name are part of every recorded run: a run in "
        "flight fails on recovery when they change. Change them only with a WORKFLOW_VERSION bump and a "
        "drain (see the docstring of app/pipeline/workflow.py), then update this test."
    )
    assert [step.value for step in StepName] == [
        "prepare_workspace", "setup", "implement", "review", "lint", "test", "baseline", "fix",
        "commit", "push", "open_pr", "report",
    ], message  # fmt: skip
    assert (workflow.WORKFLOW_NAME, workflow.WORKFLOW_VERSION) == ("ticket_run", "1"), message
    assert workflow.QUEUE_NAME == "tickets", message
    # Each DBOS step is recorded under its StepName value, the workflow under WORKFLOW_NAME.
    registered: dict[Any, str] = {
        workflow._ticket_run: workflow.WORKFLOW_NAME,
        workflow._prepare_step: StepName.PREPARE_WORKSPACE,
        workflow._setup_step: StepName.SETUP,
        workflow._implement_step: StepName.IMPLEMENT,
        workflow._review_step: StepName.REVIEW,
        workflow._lint_step: StepName.LINT,
        workflow._test_step: StepName.TEST,
        workflow._baseline_step: StepName.BASELINE,
        workflow._fix_step: StepName.FIX,
        workflow._commit_step: StepName.COMMIT,
        workflow._push_step: StepName.PUSH,
        workflow._open_pr_step: StepName.OPEN_PR,
        workflow._report_step: StepName.REPORT,
    }
    for function, name in registered.items():
        assert function.dbos_function_name == name, message
