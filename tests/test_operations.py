"""Operating runs end to end: SIGTERM drain and resume, cancel, retry, the runs API, low disk."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import httpx
import pytest

from app.demo.model_server import Script, ToolCall, Turn
from app.demo.sample import IMPLEMENT_TRIGGER, demo_scripts
from tests.pipeline import Stack, session_of, ticket_body

pytestmark = pytest.mark.e2e


def slow_implementation(seconds: int = 6) -> list[Script]:
    """The demo's scripts, with an implementation that first runs `sleep` for a while."""
    scripts = []
    for script in demo_scripts():
        if script.trigger == IMPLEMENT_TRIGGER:
            # A bare `sleep N` may be answered at once by the CLI; this form really waits.
            pause = Turn(tool_calls=[ToolCall.bash(f"echo working; sleep {seconds}; echo done")])
            script = dataclasses.replace(script, turns=[pause, *script.turns])
        scripts.append(script)
    return scripts


def agent_pid(stack: Stack, run_id: str) -> int:
    pidfile = stack.workspace / ".auto-code" / "agent" / "runs" / run_id / "agent.pid"
    deadline = time.monotonic() + 30
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return int(pidfile.read_text())


def gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        stat = Path(f"/proc/{pid}/stat")
        if stat.exists() and stat.read_text().split()[2] == "Z":
            return True
        time.sleep(0.05)
    return False


def test_sigterm_drains_exits_fast_and_the_run_resumes_after_restart(tmp_path: Path) -> None:
    settings = {"RUN_REVIEW": "false", "SHUTDOWN_DRAIN": "2s"}
    with Stack(tmp_path, slow_implementation(), settings=settings) as stack:
        service = stack.service()
        run_id = service.post_ticket(ticket_body())["run_id"]
        service.wait_for_step(run_id, "implement")
        pid = agent_pid(stack, run_id)

        assert service.process is not None
        service.process.send_signal(15)
        time.sleep(0.3)
        refused = service.post_ticket(ticket_body("SHOP-2"), expect=503)
        assert "error" in refused
        service.process.wait(timeout=20)
        assert gone(pid, within=5), "the agent outlived the service's shutdown"

        restarted = stack.service(port=service.port)
        run = restarted.wait_for(run_id)
        steps = [(s["name"], s["status"], s["summary"][:200]) for s in run["steps"]]
        assert run["state"] == "pr_opened", (run["reason"], steps, restarted.logs()[-3000:])
        assert len(stack.github.pulls) == 1
        implements = [step for step in run["steps"] if step["name"] == "implement"]
        assert len(implements) == 1


def test_cancel_during_implement_stops_the_agent_and_retry_succeeds_on_the_same_branch_and_session(
    tmp_path: Path,
) -> None:
    with Stack(tmp_path, slow_implementation(8), settings={"RUN_REVIEW": "false"}) as stack:
        service = stack.service()
        run_id = service.post_ticket(ticket_body())["run_id"]
        service.wait_for_step(run_id, "implement")
        pid = agent_pid(stack, run_id)
        # The fenced CLI starts behind bwrap and the bridge: cancel once it is talking to the model.
        deadline = time.monotonic() + 30
        while not stack.model.message_requests and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)

        started = time.monotonic()
        cancelled = service.api("POST", f"/runs/{run_id}/cancel")
        assert cancelled.status_code == 202, cancelled.text
        assert gone(pid, within=5), "the agent kept running after cancel"
        assert time.monotonic() - started < 5
        run = service.wait_for(run_id, timeout=30)
        assert run["state"] == "cancelled"
        assert service.api("POST", f"/runs/{run_id}/cancel").status_code == 409

        # The session the cancelled run's agent was using, as the CLI named it to the model.
        first_session = session_of(stack.model.message_requests[0])
        assert first_session
        retried = service.api("POST", f"/runs/{run_id}/retry")
        assert retried.status_code == 202, retried.text
        retry_id = retried.json()["run_id"]
        assert retry_id != run_id
        run = service.wait_for(retry_id)
        assert run["state"] == "pr_opened", run
        assert run["retry_of"] == run_id
        assert run["result"]["branch"] == "ticket/shop-1"
        assert run["result"]["session_id"] == first_session
        assert {session_of(request) for request in stack.model.message_requests} == {first_session}
        assert len(stack.github.pulls) == 1


def test_runs_api_shows_steps_while_running_and_after(tmp_path: Path) -> None:
    with Stack(tmp_path, slow_implementation(3), settings={"RUN_REVIEW": "false"}) as stack:
        service = stack.service()
        run_id = service.post_ticket(ticket_body())["run_id"]
        running = service.wait_for_step(run_id, "implement")
        assert running["state"] == "running"
        prepare, implement = running["steps"][:2]
        assert prepare["name"] == "prepare_workspace" and prepare["status"] == "ok"
        assert prepare["started_at"] and prepare["ended_at"] and "worktree" in prepare["summary"]
        assert implement["status"] == "running" and implement["started_at"]

        listed = service.api("GET", "/runs", params={"ticket": "SHOP-1"}).json()["runs"]
        assert [r["run_id"] for r in listed] == [run_id]

        done = service.wait_for(run_id)
        assert done["state"] == "pr_opened"
        assert all(step["ended_at"] and step["summary"] for step in done["steps"])
        assert done["cost_usd"] > 0 and done["turns"] > 0 and done["pr_url"]
        cli = service.cli
        listing = cli("list", "--ticket", "SHOP-1")
        assert listing.returncode == 0 and run_id in listing.stdout and "pr_opened" in listing.stdout
        shown = cli("show", run_id)
        assert "prepare_workspace" in shown.stdout and done["pr_url"] in shown.stdout
        as_json = json.loads(cli("show", run_id, "--json").stdout)
        assert as_json["state"] == "pr_opened"
        refused = cli("cancel", run_id)
        assert refused.returncode == 1 and "409" in refused.stderr
        wrong_token = cli("list", token="wrong-token-0123456789")
        assert wrong_token.returncode == 1 and "401" in wrong_token.stderr
        finished = service.api("GET", "/runs", params={"state": "pr_opened"}).json()["runs"]
        assert [r["run_id"] for r in finished] == [run_id]
        assert service.api("GET", "/runs", params={"state": "failed"}).json()["runs"] == []

        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
            assert httpx.get(f"{service.url}/runs", headers=headers, timeout=10).status_code == 401
            assert httpx.get(f"{service.url}/runs/{run_id}", headers=headers, timeout=10).status_code == 401
            cancel = httpx.post(f"{service.url}/runs/{run_id}/cancel", headers=headers, timeout=10)
            assert cancel.status_code == 401
        assert service.api("GET", "/runs/no-such-run").status_code == 404
        assert service.api("GET", "/runs", params={"state": "nonsense"}).status_code == 422


def test_a_run_refused_for_low_disk_says_so(tmp_path: Path) -> None:
    with Stack(tmp_path, demo_scripts(), settings={"MIN_FREE_DISK_MB": str(10**12)}) as stack:
        service = stack.service()
        run = service.wait_for(service.post_ticket(ticket_body())["run_id"])
    assert run["state"] == "failed"
    assert run["result"]["failed_step"] == "prepare_workspace"
    assert "MIN_FREE_DISK_MB" in run["reason"] and "free under WORKSPACE_DIR" in run["reason"]
    assert stack.model.message_requests == []
