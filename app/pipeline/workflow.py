"""The pipeline of one ticket as a durable DBOS workflow: ordered steps, fix loops, exactly once.

Each step's result is stored (as JSON) when it ends, so a run interrupted by a crash, kill -9 or deploy
continues after its last finished step on restart, with the same agent session. The workflow body is a
pure function of its input and of the recorded step results; everything that touches the world is a
step, and every step is written to be safe to run again.

The step names and their order are part of the recorded history: a run in flight whose code changes
its sequence fails on recovery with DBOSUnexpectedStepError. tests/test_pipeline_durability.py pins
them. To change them, bump WORKFLOW_VERSION. A replica runs and recovers only runs of its own version,
so drain before the new version takes over: stop intake on every replica (SIGTERM or no traffic), let
`GET /runs?state=queued` and `GET /runs?state=running` empty on the old version, then deploy.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dbos import DBOS
from dbos._error import DBOSException

from app.errors import AutoCodeError, SandboxTampered
from app.logger import get_logger
from app.models import (
    AgentResult,
    CheckResult,
    Gate,
    GateReport,
    ReviewResult,
    RunResult,
    RunState,
    StepName,
)
from app.pipeline.checks import failure_fingerprints, new_failures
from app.pipeline.steps import Pipeline, RunInput, _err

log = get_logger(__name__)

WORKFLOW_NAME = "ticket_run"
WORKFLOW_VERSION = "1"
QUEUE_NAME = "tickets"

# --- the DBOS steps (each records its result) ---------------------------------------------------

_pipeline: Pipeline | None = None


def use_pipeline(pipeline: Pipeline | None) -> None:
    """Set the pipeline the DBOS steps of this process call (None once the runner stops)."""
    global _pipeline
    _pipeline = pipeline


def _active() -> Pipeline:
    if _pipeline is None:
        raise RuntimeError("the runner is not started in this process")
    return _pipeline


async def _guarded(step: StepName, call: Awaitable[dict[str, Any]], run: RunInput) -> dict[str, Any]:
    """Run a step's work; a domain error becomes a recorded failed result, not an exception."""
    if time.time() > run.deadline:
        call.close()  # type: ignore[attr-defined]
        return _err(f"run timed out before {step.value}")
    started = time.monotonic()
    log.info("step started", ticket=run.ticket.key, run_id=run.run_id, step=step.value)
    try:
        output = await call
    except SandboxTampered as exc:
        why = "code run in the sandbox rewrote the worktree's git files; the service's git refused them"
        output = _err(why, quarantine=[str(exc)])
    except AutoCodeError as exc:
        output = _err(str(exc))
    output["seconds"] = round(time.monotonic() - started, 3)
    log.info(
        "step finished",
        ticket=run.ticket.key,
        run_id=run.run_id,
        step=step.value,
        ok=output["ok"],
        summary=output["summary"][:300],
    )
    return output


@DBOS.step(name=StepName.PREPARE_WORKSPACE.value)
async def _prepare_step(raw: dict[str, Any]) -> dict[str, Any]:
    run = RunInput.model_validate(raw)
    return await _guarded(StepName.PREPARE_WORKSPACE, _active().prepare(run), run)


@DBOS.step(name=StepName.SETUP.value, preemptible=True)
async def _setup_step(raw: dict[str, Any], prepared: dict[str, Any]) -> dict[str, Any]:
    run = RunInput.model_validate(raw)
    return await _guarded(StepName.SETUP, _active().setup(run, prepared), run)


@DBOS.step(name=StepName.IMPLEMENT.value, preemptible=True)
async def _implement_step(raw: dict[str, Any], prepared: dict[str, Any], spent: float) -> dict[str, Any]:
    run = RunInput.model_validate(raw)
    return await _guarded(StepName.IMPLEMENT, _active().implement(run, prepared, spent), run)


@DBOS.step(name=StepName.REVIEW.value, preemptible=True)
async def _review_step(raw: dict[str, Any], prepared: dict[str, Any], spent: float) -> dict[str, Any]:
    run = RunInput.model_validate(raw)
    return await _guarded(StepName.REVIEW, _active().review(run, prepared, spent), run)


@DBOS.step(name=StepName.LINT.value, preemptible=True)
async def _lint_step(raw: dict[str, Any], prepared: dict[str, Any]) -> dict[str, Any]:
    run = RunInput.model_validate(raw)
    return await _guarded(StepName.LINT, _active().check(run, Gate.LINT, prepared), run)


@DBOS.step(name=StepName.TEST.value, preemptible=True)
async def _test_step(raw: dict[str, Any], prepared: dict[str, Any]) -> dict[str, Any]:
    run = RunInput.model_validate(raw)
    return await _guarded(StepName.TEST, _active().check(run, Gate.TEST, prepared), run)


@DBOS.step(name=StepName.BASELINE.value, preemptible=True)
async def _baseline_step(raw: dict[str, Any], prepared: dict[str, Any], gate: str) -> dict[str, Any]:
    run = RunInput.model_validate(raw)
    return await _guarded(StepName.BASELINE, _active().baseline(run, Gate(gate), prepared), run)


@DBOS.step(name=StepName.FIX.value, preemptible=True)
async def _fix_step(
    raw: dict[str, Any], prepared: dict[str, Any], feedback: str, spent: float
) -> dict[str, Any]:
    run = RunInput.model_validate(raw)
    return await _guarded(StepName.FIX, _active().fix(run, prepared, feedback, spent), run)


@DBOS.step(name=StepName.COMMIT.value)
async def _commit_step(raw: dict[str, Any], prepared: dict[str, Any]) -> dict[str, Any]:
    run = RunInput.model_validate(raw)
    return await _guarded(StepName.COMMIT, _active().commit(run, prepared), run)


@DBOS.step(name=StepName.PUSH.value)
async def _push_step(
    raw: dict[str, Any], prepared: dict[str, Any], result: dict[str, Any] | None = None
) -> dict[str, Any]:
    run = RunInput.model_validate(raw)
    outcome = (
        RunResult.model_validate(result)
        if result
        else RunResult(run_id=run.run_id, ticket=run.ticket.key, state=RunState.RUNNING)
    )
    return await _guarded(StepName.PUSH, _active().push(run, prepared, outcome), run)


@DBOS.step(name=StepName.OPEN_PR.value)
async def _open_pr_step(
    raw: dict[str, Any], prepared: dict[str, Any], result: dict[str, Any]
) -> dict[str, Any]:
    run = RunInput.model_validate(raw)
    outcome = RunResult.model_validate(result)
    return await _guarded(StepName.OPEN_PR, _active().open_pr(run, prepared, outcome), run)


@DBOS.step(name=StepName.REPORT.value)
async def _report_step(
    raw: dict[str, Any], result: dict[str, Any], prepared: dict[str, Any] | None
) -> dict[str, Any]:
    run = RunInput.model_validate(raw)
    outcome = RunResult.model_validate(result)
    # The report runs even past the deadline: a run that timed out must still say so on the ticket.
    run = run.model_copy(update={"deadline": float("inf")})
    return await _guarded(StepName.REPORT, _active().report(run, outcome, prepared), run)


# --- the workflow (deterministic over recorded step results) --------------------------------------

CURRENT_STEP_EVENT = "current_step"


def _failure_list(result: CheckResult) -> str:
    """One line a failure when the output names them, else the output's tail."""
    return "\n".join(sorted(failure_fingerprints(result.output))) or result.output[-3000:]


async def _announced(step: StepName, call: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """Publish which step starts (DBOS lists a step only once it ends), then run it."""
    await DBOS.set_event_async(CURRENT_STEP_EVENT, {"name": step.value, "started_at": time.time()})
    return await call


@dataclass
class _Flow:
    """The decisions of one run; holds only what it derives from recorded step results."""

    raw: dict[str, Any]
    run: RunInput
    result: RunResult
    prepared: dict[str, Any] | None = None
    findings: list[str] = field(default_factory=list)

    def spend(self, agent: dict[str, Any], phase: str) -> AgentResult:
        outcome = AgentResult.model_validate(agent)
        self.result.turns += outcome.turns
        self.result.cost_usd = round(self.result.cost_usd + outcome.cost_usd, 6)
        self.result.denials.extend(outcome.denials)
        self.saw(outcome.network, outcome.canaries, outcome.fenced, phase)
        return outcome

    def saw(self, network: list[dict[str, Any]], canaries: list[str], fenced: bool, phase: str) -> None:
        """Add a sandboxed phase's network record and any decoy its egress proxy saw."""
        self.result.network.extend(network)
        self.result.fenced = fenced if self.result.fenced is None else self.result.fenced and fenced
        self.result.evidence.extend(f"egress proxy, {phase} phase: {name}" for name in canaries)

    def checked(self, output: dict[str, Any], phase: str) -> CheckResult:
        check = CheckResult.model_validate(output["check"])
        self.saw(check.network, check.canaries, check.fenced, phase)
        return check

    def fail(self, step: StepName, reason: str) -> RunResult:
        self.result.state = RunState.FAILED
        self.result.failed_step = step
        self.result.reason = reason
        return self.result

    def quarantine(self, step: StepName, evidence: Sequence[str] = (), why: str = "") -> RunResult:
        """End the run quarantined: nothing more leaves, the worktree stays as evidence."""
        self.result.evidence.extend(line for line in evidence if line not in self.result.evidence)
        self.result.state = RunState.QUARANTINED
        self.result.failed_step = step
        why = why or "a decoy credential left the sandbox"
        self.result.reason = (
            f"quarantined at {step.value}: {why} ({'; '.join(self.result.evidence)})."
            " Nothing was pushed; the worktree is kept for inspection."
        )
        return self.result

    def stopped(self, step: StepName, output: dict[str, Any]) -> RunResult | None:
        """The run's end when this step's output quarantines it or a decoy was seen; else None."""
        if output.get("quarantine"):
            return self.quarantine(step, output["quarantine"], output.get("summary", ""))
        if self.result.evidence:
            return self.quarantine(step)
        return None

    async def execute(self) -> RunResult:
        prepared = await _announced(StepName.PREPARE_WORKSPACE, _prepare_step(self.raw))
        if not prepared["ok"]:
            return self.fail(StepName.PREPARE_WORKSPACE, prepared["error"])
        self.prepared = prepared
        self.result.session_id = prepared["session_id"]
        self.result.branch = prepared["branch"]
        self.result.base_branch = prepared["base_branch"]
        self.result.worktree = prepared["path"]

        if self.run.options.run_setup:
            setup = await _announced(StepName.SETUP, _setup_step(self.raw, prepared))
            check = self.checked(setup, "setup") if setup["ok"] else None
            if (stop := self.stopped(StepName.SETUP, setup)) is not None:
                return stop
            if not setup["ok"]:
                return self.fail(StepName.SETUP, setup["error"])
            assert check is not None
            if check.status in ("failed", "error"):
                detail = f"{check.reason}\n{check.output[-3000:]}".strip()
                return self.fail(StepName.SETUP, f"the setup command failed: {detail}")

        implemented = await _announced(
            StepName.IMPLEMENT, _implement_step(self.raw, prepared, self.result.cost_usd)
        )
        if (stop := self.stopped(StepName.IMPLEMENT, implemented)) is not None:
            return stop
        if not implemented["ok"]:
            return self.fail(StepName.IMPLEMENT, implemented["error"])
        agent = self.spend(implemented["agent"], "agent")
        self.result.summary = agent.summary
        if (stop := self.stopped(StepName.IMPLEMENT, implemented)) is not None:
            return stop
        if not agent.ok:
            return self.fail(StepName.IMPLEMENT, agent.reason or agent.outcome)
        if not implemented["files"]:
            self.result.state = RunState.NO_CHANGES
            self.result.reason = "the agent changed no file"
            return self.result

        failure = await self.gates(prepared)
        if failure is not None:
            return failure
        return await self.deliver(prepared)

    async def gates(self, prepared: dict[str, Any]) -> RunResult | None:
        """Run every enabled gate in order; after any fix, start again from the first gate."""
        gates = self.run.options.gates()
        rounds = dict.fromkeys(gates, 0)
        baselines: dict[Gate, CheckResult] = {}
        reports: dict[Gate, GateReport] = {}
        index = 0
        while index < len(gates):
            gate = gates[index]
            feedback, report, failure = await self.gate_once(gate, prepared, baselines)
            if failure is not None:
                return failure
            report.rounds = rounds[gate]
            reports[gate] = report
            if feedback is None:
                index += 1
                continue
            if rounds[gate] >= self.run.options.max_fix_rounds:
                self.result.gates = list(reports.values())
                state = "failing" if report.status == "failed" else report.status.replace("_", " ")
                detail = f"{gate.value} still {state} after {rounds[gate]} fix rounds"
                return self.fail(StepName(gate.value), f"{detail}:\n{(feedback or report.detail)[-3000:]}")
            rounds[gate] += 1
            if feedback:
                fixed = await _announced(
                    StepName.FIX, _fix_step(self.raw, prepared, feedback, self.result.cost_usd)
                )
                if (stop := self.stopped(StepName.FIX, fixed)) is not None:
                    return stop
                if not fixed["ok"]:
                    return self.fail(StepName.FIX, fixed["error"])
                outcome = self.spend(fixed["agent"], "agent")
                if (stop := self.stopped(StepName.FIX, fixed)) is not None:
                    return stop
                if not outcome.ok:
                    return self.fail(StepName.FIX, outcome.reason or outcome.outcome)
                if outcome.summary:
                    self.result.summary = outcome.summary
            index = 0
        self.result.gates = [reports[gate] for gate in gates]
        return None

    async def gate_once(
        self, gate: Gate, prepared: dict[str, Any], baselines: dict[Gate, CheckResult]
    ) -> tuple[str | None, GateReport, RunResult | None]:
        """Run one gate: (feedback for the agent or None when it passed, its report, a terminal failure)."""
        step = StepName(gate.value)
        if gate is Gate.REVIEW:
            output = await _announced(StepName.REVIEW, _review_step(self.raw, prepared, self.result.cost_usd))
            if (stop := self.stopped(step, output)) is not None:
                return None, GateReport(gate=gate, status="error"), stop
            if not output["ok"]:
                return None, GateReport(gate=gate, status="error"), self.fail(step, output["error"])
            review = ReviewResult.model_validate(output["review"])
            self.spend(review.agent.model_dump(), "agent")
            if (stop := self.stopped(step, output)) is not None:
                return None, GateReport(gate=gate, status="error"), stop
            if review.verdict == "passed":
                return None, GateReport(gate=gate, status="passed"), None
            if review.verdict == "inconclusive":
                # Never a pass: spend a round and ask again, without sending the agent anything to fix.
                return "", GateReport(gate=gate, status="inconclusive", detail=review.findings[-2000:]), None
            self.findings.append(review.findings)
            self.result.review_findings = list(self.findings)
            feedback = f"A code review of your change found these issues; fix them:\n\n{review.findings}"
            return feedback, GateReport(gate=gate, status="has_issues", detail=review.findings[-2000:]), None

        call = _lint_step if gate is Gate.LINT else _test_step
        output = await _announced(step, call(self.raw, prepared))
        if (stop := self.stopped(step, output)) is not None:
            return None, GateReport(gate=gate, status="error"), stop
        if not output["ok"]:
            return None, GateReport(gate=gate, status="error"), self.fail(step, output["error"])
        check = self.checked(output, gate.value)
        if (stop := self.stopped(step, output)) is not None:
            return None, GateReport(gate=gate, status="error"), stop
        if check.status == "error":
            return (
                None,
                GateReport(gate=gate, status="error", detail=check.reason),
                self.fail(step, check.reason),
            )
        if check.status != "failed":
            return None, GateReport(gate=gate, status=check.status, detail=check.reason), None
        if gate not in baselines:
            base = await _announced(StepName.BASELINE, _baseline_step(self.raw, prepared, gate.value))
            if base["ok"]:
                self.checked(base, f"{gate.value} baseline")
            if (stop := self.stopped(StepName.BASELINE, base)) is not None:
                return None, GateReport(gate=gate, status="error"), stop
            if not base["ok"]:
                return (
                    None,
                    GateReport(gate=gate, status="error"),
                    self.fail(StepName.BASELINE, base["error"]),
                )
            baselines[gate] = CheckResult.model_validate(base["check"])
        fresh = new_failures(check, baselines[gate])
        if fresh is None:
            report = GateReport(
                gate=gate, status="failing on base", detail=check.reason, preexisting=_failure_list(check)
            )
            return None, report, None
        command = " ".join(check.command)
        feedback = f"`{command}` failed ({check.reason}). Fix the cause, then stop.\n\n{fresh[-8000:]}"
        return feedback, GateReport(gate=gate, status="failed", detail=check.output[-2000:]), None

    async def deliver(self, prepared: dict[str, Any]) -> RunResult:
        """Commit, push and open the PR; under DRY_RUN stop before any of them."""
        if self.run.options.dry_run:
            self.result.state = RunState.DRY_RUN
            self.result.reason = "DRY_RUN: nothing committed or pushed; the worktree is kept"
            self.result.removal_hint = _active().parts.workspace.removal_hint(_active()._worktree(prepared))
            return self.result
        committed = await _announced(StepName.COMMIT, _commit_step(self.raw, prepared))
        if (stop := self.stopped(StepName.COMMIT, committed)) is not None:
            return stop
        if not committed["ok"]:
            return self.fail(StepName.COMMIT, committed["error"])
        self.result.files = committed["files"]
        self.result.insertions = committed["insertions"]
        self.result.deletions = committed["deletions"]
        self.result.skipped_files = committed["skipped"]
        if committed["sha"] is None:
            self.result.state = RunState.NO_CHANGES
            self.result.reason = "nothing to commit after the checks"
            return self.result
        self.result.commit = committed["sha"]
        pushed = await _announced(
            StepName.PUSH, _push_step(self.raw, prepared, self.result.model_dump(mode="json"))
        )
        if (stop := self.stopped(StepName.PUSH, pushed)) is not None:
            return stop
        if not pushed["ok"]:
            return self.fail(StepName.PUSH, pushed["error"])
        if not self.run.options.open_pr:
            self.result.state = RunState.PUSHED
            self.result.reason = (
                f"branch {self.result.branch} pushed; no GitHub repository configured for a PR"
            )
            return self.result
        opened = await _announced(
            StepName.OPEN_PR, _open_pr_step(self.raw, prepared, self.result.model_dump(mode="json"))
        )
        if not opened["ok"]:
            return self.fail(StepName.OPEN_PR, opened["error"])
        self.result.pr_url = opened["url"]
        self.result.state = RunState.PR_OPENED
        return self.result


@DBOS.workflow(name=WORKFLOW_NAME)
async def _ticket_run(raw: dict[str, Any]) -> dict[str, Any]:
    run = RunInput.model_validate(raw)
    flow = _Flow(
        raw=raw,
        run=run,
        result=RunResult(
            run_id=run.run_id, ticket=run.ticket.key, state=RunState.RUNNING, retry_of=run.retry_of
        ),
    )
    try:
        result = await flow.execute()
    except DBOSException:
        raise
    except Exception as exc:  # an unexpected error still ends the run in a state a person can see
        log.exception("run crashed", ticket=run.ticket.key, run_id=run.run_id)
        result = flow.fail(StepName.REPORT, f"internal error: {type(exc).__name__}: {exc}")
    if found := _active().withhold(run, result):  # e.g. a failing test that printed a decoy
        why = "a decoy credential is in what the ticket would be told"
        result = flow.quarantine(result.failed_step or StepName.REPORT, found, why)
    await _announced(StepName.REPORT, _report_step(raw, result.model_dump(mode="json"), flow.prepared))
    log.info(
        "run finished",
        ticket=run.ticket.key,
        run_id=run.run_id,
        state=result.state.value,
        reason=result.reason[:300],
        pr_url=result.pr_url,
        cost_usd=result.cost_usd,
    )
    return result.model_dump(mode="json")
