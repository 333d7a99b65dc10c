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

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from dbos import DBOS, DBOSConfig, SetEnqueueOptions, SetWorkflowID, SetWorkflowTimeout
from dbos._error import DBOSException, DBOSWorkflowIDInUseError
from dbos._serialization import DBOSPortableJSON
from pydantic import BaseModel, Field

from app.errors import AutoCodeError, RunConflict, RunNotFound, SandboxTampered
from app.logger import get_logger
from app.models import (
    AgentResult,
    CheckResult,
    Gate,
    GateReport,
    PipelineOptions,
    ReviewResult,
    RunResult,
    RunState,
    StepName,
    Submission,
    Ticket,
)
from app.pipeline.checks import failure_fingerprints, new_failures

log = get_logger(__name__)

WORKFLOW_NAME = "ticket_run"
WORKFLOW_VERSION = "1"
QUEUE_NAME = "tickets"


# --- ports: what the pipeline needs of its collaborators ----------------------------------------


class FileLike(Protocol):
    """One changed (or skipped) file."""

    @property
    def path(self) -> str: ...


class ChangesLike(Protocol):
    """What changed in a working copy."""

    @property
    def files(self) -> Sequence[FileLike]: ...
    @property
    def insertions(self) -> int: ...
    @property
    def deletions(self) -> int: ...
    @property
    def diff(self) -> str: ...
    @property
    def skipped(self) -> Sequence[Any]: ...


def _names(changes: ChangesLike) -> list[str]:
    return [change.path for change in changes.files]


class WorkspacePort(Protocol):
    """git: a working copy per ticket, its changes, commit, push, and a checkout of the base commit."""

    async def prepare(self, key: str) -> Any: ...
    def worktree_from(self, data: dict[str, Any]) -> Any: ...
    async def changes(self, worktree: Any) -> ChangesLike: ...
    async def commit(self, worktree: Any, ticket: Ticket) -> str | None: ...
    async def push(self, worktree: Any) -> str: ...
    async def remove(self, worktree: Any) -> None: ...
    def removal_hint(self, worktree: Any) -> str: ...
    def base_checkout(self, worktree: Any) -> AbstractAsyncContextManager[Path]: ...


class AgentPort(Protocol):
    """Agent sessions: implement, review (a fresh read-only session), fix (the implement session resumed)."""

    async def implement(
        self,
        ticket: Ticket,
        worktree: Path,
        *,
        session_id: str,
        budget_usd: float,
        deadline: float,
        run_id: str,
    ) -> AgentResult: ...
    async def review(
        self, ticket: Ticket, worktree: Path, diff: str, *, budget_usd: float, deadline: float, run_id: str
    ) -> ReviewResult: ...
    async def fix(
        self,
        worktree: Path,
        feedback: str,
        *,
        session_id: str,
        budget_usd: float,
        deadline: float,
        run_id: str,
    ) -> AgentResult: ...


class ChecksPort(Protocol):
    """The repository's setup, lint and test commands, each in its own fenced sandbox."""

    async def run(self, gate: Gate, repo: Path, run_id: str = "") -> CheckResult: ...
    async def setup(self, repo: Path, run_id: str = "") -> CheckResult: ...


class PullRequestsPort(Protocol):
    """The forge: find the branch's open PR or open one."""

    async def open_pr(self, *, branch: str, base: str, title: str, body: str) -> Any: ...


class ReporterPort(Protocol):
    """Tells the ticket how its run ended (a Jira comment), when configured."""

    async def report(self, ticket: Ticket, result: RunResult) -> None: ...


PrBody = Callable[["RunResult", Ticket], str]


@dataclass
class Collaborators:
    """Everything the pipeline calls out to, built once by the lifespan."""

    workspace: WorkspacePort
    agent: AgentPort
    checks: ChecksPort
    pull_requests: PullRequestsPort | None
    reporter: ReporterPort
    pr_body: PrBody
    before_start: Callable[[], Awaitable[None]] | None = None
    # Why a run cannot start right now (low disk, ...), or None.
    preflight: Callable[[], str | None] | None = None
    # Decoy credentials of a run: where they are found (text that is about to leave), by name.
    find_canaries: Callable[[str, str | bytes], list[str]] | None = None
    # Housekeeping: remove worktrees past their TTL at `now` except those of active tickets; remove
    # agent state older than a cutoff (epoch seconds) except that of active runs and sessions.
    cleanup_worktrees: Callable[[set[str], datetime], Awaitable[list[Path]]] | None = None
    cleanup_agent_state: Callable[[float, set[str], set[str]], Awaitable[int]] | None = None


# --- records ------------------------------------------------------------------------------------


class RunInput(BaseModel):
    """What a run is started with; fixed at acceptance so a recovered run behaves the same."""

    run_id: str
    ticket: Ticket
    options: PipelineOptions
    deadline: float
    session_id: str | None = None
    retry_of: str | None = None


def _failure_list(result: CheckResult) -> str:
    """One line a failure when the output names them, else the output's tail."""
    return "\n".join(sorted(failure_fingerprints(result.output))) or result.output[-3000:]


def _check_summary(result: CheckResult) -> str:
    command = " ".join(result.command) or "-"
    detail = f" ({result.reason})" if result.reason else ""
    return f"{result.status}{detail}: {command}"


def _out(summary: str, **data: Any) -> dict[str, Any]:
    return {"ok": True, "summary": summary, **data}


def _err(summary: str, *, quarantine: list[str] | None = None) -> dict[str, Any]:
    """A failed step; `quarantine` names what was found when the run must end quarantined."""
    failed: dict[str, Any] = {"ok": False, "summary": summary, "error": summary}
    if quarantine:
        failed["quarantine"] = quarantine
    return failed


# --- the steps (each records its result) --------------------------------------------------------


class Pipeline:
    """The steps of a run, over the collaborators; the workflow decides their order."""

    def __init__(self, parts: Collaborators) -> None:
        self.parts = parts

    def _worktree(self, prepared: dict[str, Any]) -> Any:
        return self.parts.workspace.worktree_from(prepared["worktree"])

    @staticmethod
    def _left(run: RunInput, spent: float) -> float:
        return max(run.options.max_budget_usd - spent, 0.0)

    async def prepare(self, run: RunInput) -> dict[str, Any]:
        problem = self.parts.preflight() if self.parts.preflight else None
        if problem is not None:
            return _err(f"the run cannot start: {problem}")
        worktree = await self.parts.workspace.prepare(run.ticket.key)
        # The session id is chosen here and recorded, so every later phase and every restart resumes it.
        session_id = run.session_id or str(uuid.uuid4())
        return _out(
            f"worktree {worktree.path} on {worktree.branch} from {worktree.base_branch}",
            worktree=worktree.to_dict(),
            session_id=session_id,
            branch=worktree.branch,
            base_branch=worktree.base_branch,
            path=str(worktree.path),
        )

    async def implement(self, run: RunInput, prepared: dict[str, Any], spent: float) -> dict[str, Any]:
        worktree = self._worktree(prepared)
        result = await self.parts.agent.implement(
            run.ticket,
            worktree.path,
            session_id=prepared["session_id"],
            budget_usd=self._left(run, spent),
            deadline=run.deadline,
            run_id=run.run_id,
        )
        changes = await self.parts.workspace.changes(worktree)
        summary = (
            f"{result.outcome}, {len(changes.files)} files changed, {result.turns} turns: {result.summary}"
        )
        return _out(summary, agent=result.model_dump(mode="json"), files=_names(changes))

    async def review(self, run: RunInput, prepared: dict[str, Any], spent: float) -> dict[str, Any]:
        worktree = self._worktree(prepared)
        changes = await self.parts.workspace.changes(worktree)
        result = await self.parts.agent.review(
            run.ticket,
            worktree.path,
            changes.diff,
            budget_usd=self._left(run, spent),
            deadline=run.deadline,
            run_id=run.run_id,
        )
        return _out(f"{result.verdict}: {result.findings}", review=result.model_dump(mode="json"))

    async def setup(self, run: RunInput, prepared: dict[str, Any]) -> dict[str, Any]:
        result = await self.parts.checks.setup(self._worktree(prepared).path, run.run_id)
        return _out(_check_summary(result), check=result.model_dump(mode="json"))

    async def check(self, run: RunInput, gate: Gate, prepared: dict[str, Any]) -> dict[str, Any]:
        result = await self.parts.checks.run(gate, self._worktree(prepared).path, run.run_id)
        return _out(_check_summary(result), check=result.model_dump(mode="json"))

    async def baseline(self, run: RunInput, gate: Gate, prepared: dict[str, Any]) -> dict[str, Any]:
        network: list[dict[str, Any]] = []
        canaries: list[str] = []
        async with self.parts.workspace.base_checkout(self._worktree(prepared)) as base:
            if run.options.run_setup:
                setup = await self.parts.checks.setup(base, run.run_id)
                network, canaries = setup.network, setup.canaries
                if setup.status in ("failed", "error") or canaries:
                    result = setup.model_copy(update={"gate": gate})
                    return _out(
                        f"setup on the base commit: {_check_summary(setup)}",
                        check=result.model_dump(mode="json"),
                    )
            result = await self.parts.checks.run(gate, base, run.run_id)
        result = result.model_copy(
            update={"network": [*network, *result.network], "canaries": [*canaries, *result.canaries]}
        )
        return _out(f"on the base commit: {_check_summary(result)}", check=result.model_dump(mode="json"))

    def leaks(self, run: RunInput, where: str, text: str | bytes) -> list[str]:
        """Evidence lines for every decoy of the run found in `text` (what is about to leave)."""
        if self.parts.find_canaries is None:
            return []
        return [f"{where}: {name}" for name in self.parts.find_canaries(run.run_id, text)]

    def withhold(self, run: RunInput, result: RunResult) -> list[str]:
        """Take every decoy out of what the ticket is about to be told; evidence lines for each one found.

        A network record's host is replaced by the decoy's name (a CONNECT to `<token>.evil.test` is on
        the record, its name is not repeated); a summary, reason or finding holding one is withheld.
        """
        found: list[str] = []
        for record in result.network:
            if names := self.leaks(run, "a host the sandbox asked for", str(record.get("host", ""))):
                record["host"] = "(a decoy credential)"
                found += names
        if names := self.leaks(run, "the agent's summary", result.summary):
            result.summary = "(withheld: it held a decoy credential)"
            found += names
        if names := self.leaks(run, "the run's reason", result.reason):
            result.reason = ""
            found += names
        kept = [finding for finding in result.review_findings if not self.leaks(run, "", finding)]
        if len(kept) < len(result.review_findings):
            found.append("a review finding: a decoy credential")
            result.review_findings = kept
        return list(dict.fromkeys(found))

    async def fix(
        self, run: RunInput, prepared: dict[str, Any], feedback: str, spent: float
    ) -> dict[str, Any]:
        result = await self.parts.agent.fix(
            self._worktree(prepared).path,
            feedback,
            session_id=prepared["session_id"],
            budget_usd=self._left(run, spent),
            deadline=run.deadline,
            run_id=run.run_id,
        )
        summary = f"{result.outcome}, {result.turns} turns: {result.summary}"
        return _out(summary, agent=result.model_dump(mode="json"))

    async def commit(self, run: RunInput, prepared: dict[str, Any]) -> dict[str, Any]:
        worktree = self._worktree(prepared)
        changes = await self.parts.workspace.changes(worktree)
        found = self.leaks(run, "the change to commit", changes.diff)
        for change in changes.files:  # a binary file's bytes are not in the diff
            with contextlib.suppress(OSError):
                found += self.leaks(
                    run, f"the file {change.path}", (worktree.path / change.path).read_bytes()
                )
        if found:
            return _err("a decoy credential is in the change; nothing was committed", quarantine=found)
        sha = await self.parts.workspace.commit(worktree, run.ticket)
        summary = f"committed {sha[:12]}" if sha else "nothing to commit"
        return _out(
            summary,
            sha=sha,
            files=_names(changes),
            insertions=changes.insertions,
            deletions=changes.deletions,
            skipped=[f"{item.path}: {item.reason}" for item in changes.skipped],
        )

    async def push(self, run: RunInput, prepared: dict[str, Any], result: RunResult) -> dict[str, Any]:
        ticket = run.ticket
        texts = {
            "the PR title": f"{ticket.key}: {ticket.summary}",
            "the PR body": self.parts.pr_body(result, ticket),
            "the run's summary": "\n".join([result.summary, *result.review_findings]),
        }
        found = [line for where, text in texts.items() for line in self.leaks(run, where, text)]
        if found:
            return _err(
                "a decoy credential is in what would be published; nothing was pushed", quarantine=found
            )
        sha = await self.parts.workspace.push(self._worktree(prepared))
        return _out(f"pushed {prepared['branch']} at {sha[:12]}", sha=sha)

    async def open_pr(self, run: RunInput, prepared: dict[str, Any], result: RunResult) -> dict[str, Any]:
        assert self.parts.pull_requests is not None
        pr = await self.parts.pull_requests.open_pr(
            branch=prepared["branch"],
            base=prepared["base_branch"],
            title=f"{run.ticket.key}: {run.ticket.summary}"[:250],
            body=self.parts.pr_body(result, run.ticket),
        )
        verb = "opened" if pr.created else "found open"
        return _out(f"{verb} {pr.url}", url=pr.url, number=pr.number, created=pr.created)

    async def report(
        self, run: RunInput, result: RunResult, prepared: dict[str, Any] | None
    ) -> dict[str, Any]:
        notes = []
        try:
            await self.parts.reporter.report(run.ticket, result)
        except Exception as exc:  # a report that fails must not turn a finished run into a failed one
            log.warning("report failed", ticket=run.ticket.key, run_id=run.run_id, error=str(exc))
            notes.append(f"report failed: {exc}")
        keep = result.state in (RunState.DRY_RUN, RunState.FAILED, RunState.CANCELLED, RunState.QUARANTINED)
        if prepared is not None and not keep:
            await self.parts.workspace.remove(self._worktree(prepared))
            notes.append("worktree removed")
        return _out("; ".join(notes) or "reported")


_pipeline: Pipeline | None = None


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


# --- the runner: intake, lifecycle ------------------------------------------------------------------


@dataclass(frozen=True)
class RunnerConfig:
    """Where runs are stored and how many run at once."""

    database_url: str
    executor_id: str
    options: PipelineOptions
    max_concurrent: int = 2
    replica_concurrency: int | None = None
    run_timeout: float = 7200
    polling_interval: float = 1.0
    app_version: str = WORKFLOW_VERSION
    retention_days: float = 30
    housekeeping_interval: float = 3600


def run_id_for(ticket: Ticket, delivery_id: str | None) -> str:
    """The run id: derived from Jira's delivery id when there is one, so a redelivery finds its run."""
    if delivery_id:
        digest = hashlib.sha256(delivery_id.encode()).hexdigest()[:16]
        return f"{ticket.key.lower()}-d{digest}"
    return f"{ticket.key.lower()}-{uuid.uuid4().hex[:12]}"


class Runner:
    """Takes tickets durably and runs them on a DBOS queue with a global concurrency limit."""

    def __init__(self, config: RunnerConfig, parts: Collaborators) -> None:
        self.config = config
        self.pipeline = Pipeline(parts)
        self._queue: Any = None
        self._housekeeping: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Kill what a crashed process left, then launch DBOS (which resumes interrupted runs)."""
        global _pipeline
        if self.pipeline.parts.before_start is not None:
            await self.pipeline.parts.before_start()
        _pipeline = self.pipeline
        dbos_config: DBOSConfig = {
            "name": "auto-code",
            "system_database_url": self.config.database_url,
            "application_version": self.config.app_version,
            "executor_id": self.config.executor_id,
            "serializer": DBOSPortableJSON,
            "log_level": "WARNING",
            "notification_listener_polling_interval_sec": min(self.config.polling_interval, 1.0),
        }
        DBOS(config=dbos_config)
        DBOS.launch()
        self._queue = await DBOS.register_queue_async(
            QUEUE_NAME,
            global_concurrency=self.config.max_concurrent,
            worker_concurrency=self.config.replica_concurrency,
            polling_interval_sec=self.config.polling_interval,
        )
        self._housekeeping = asyncio.create_task(self._housekeeping_loop())
        log.info(
            "runner started", executor_id=self.config.executor_id, max_concurrent=self.config.max_concurrent
        )

    async def stop(self) -> None:
        """Stop taking work; runs in flight resume on the next start."""
        global _pipeline
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
        DBOS.destroy(workflow_completion_timeout_sec=0)
        _pipeline = None

    async def _housekeeping_loop(self) -> None:
        while True:
            try:
                await self.housekeeping()
            except Exception:
                log.exception("housekeeping failed")
            await asyncio.sleep(self.config.housekeeping_interval)

    async def housekeeping(self, now: float | None = None) -> dict[str, int]:
        """Remove expired worktrees, and run records and agent state past retention; never those of a
        queued or running run."""
        now = time.time() if now is None else now
        statuses = await DBOS.list_workflows_async(
            name=WORKFLOW_NAME, status=["ENQUEUED", "PENDING"], load_output=False
        )
        active = [_record(status) for status in statuses]
        sessions = {record.input.session_id for record in active if record.input and record.input.session_id}
        for record in active:
            for step in await DBOS.list_workflow_steps_async(record.run_id):
                output = step.get("output")
                if step["function_name"] == StepName.PREPARE_WORKSPACE.value and isinstance(output, dict):
                    sessions.add(str(output.get("session_id")))
        parts = self.pipeline.parts
        keep = {record.ticket for record in active}
        moment = datetime.fromtimestamp(now, UTC)
        worktrees = await parts.cleanup_worktrees(keep, moment) if parts.cleanup_worktrees else []
        cutoff = now - self.config.retention_days * 86400
        old = await DBOS.list_workflows_async(
            name=WORKFLOW_NAME,
            status=["SUCCESS", "ERROR", "CANCELLED", "MAX_RECOVERY_ATTEMPTS_EXCEEDED"],
            completed_before=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(cutoff)),
            load_input=False,
            load_output=False,
        )
        if old:
            await DBOS.delete_workflows_async([status.workflow_id for status in old])
        runs = {record.run_id for record in active}
        agent_state = 0
        if parts.cleanup_agent_state is not None:
            agent_state = await parts.cleanup_agent_state(cutoff, runs, sessions)
        removed = {"worktrees": len(worktrees), "runs": len(old), "agent_state": agent_state}
        if any(removed.values()):
            log.info("housekeeping removed", **removed)
        return removed

    async def __aenter__(self) -> Runner:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def submit(self, ticket: Ticket, delivery_id: str | None) -> Submission:
        """Enqueue the ticket unless it already has a run queued or running (or this delivery had one)."""
        return await self._enqueue(ticket, run_id_for(ticket, delivery_id))

    async def _enqueue(
        self, ticket: Ticket, run_id: str, *, session_id: str | None = None, retry_of: str | None = None
    ) -> Submission:
        if await DBOS.get_workflow_status_async(run_id) is not None:
            return Submission(run_id=run_id, duplicate=True)
        run = RunInput(
            run_id=run_id,
            ticket=ticket,
            options=self.config.options,
            deadline=time.time() + self.config.run_timeout,
            session_id=session_id,
            retry_of=retry_of,
        )
        try:
            # "reject": of concurrent deliveries with one id, exactly one creates the run (checked
            # in the database, so across replicas too); the others are told they are duplicates.
            with (
                SetWorkflowID(run_id, workflow_id_reuse_policy="reject"),
                SetWorkflowTimeout(self.config.run_timeout + 600),
                SetEnqueueOptions(deduplication_id=ticket.key, duplication_policy="return-existing"),
            ):
                handle = await self._queue.enqueue_async(_ticket_run, run.model_dump(mode="json"))
        except DBOSWorkflowIDInUseError:
            log.info("run duplicate", ticket=ticket.key, run_id=run_id)
            return Submission(run_id=run_id, duplicate=True)
        duplicate = handle.workflow_id != run_id
        log.info("run duplicate" if duplicate else "run queued", ticket=ticket.key, run_id=handle.workflow_id)
        return Submission(run_id=handle.workflow_id, duplicate=duplicate)

    # --- operating runs -----------------------------------------------------------------------

    async def list_runs(
        self, *, ticket: str | None = None, state: RunState | None = None, limit: int = 50
    ) -> list[RunRecord]:
        """Runs, newest first, optionally of one ticket and in one state (steps not included)."""
        prefix = f"{ticket.lower()}-" if ticket else None
        dbos_status = _DBOS_STATUS_FOR.get(state) if state else None
        statuses = await DBOS.list_workflows_async(
            name=WORKFLOW_NAME,
            workflow_id_prefix=prefix,
            status=dbos_status,
            sort_desc=True,
            limit=None if state in _FINAL_STATES else limit,
        )
        records = [_record(status) for status in statuses]
        if state is not None:
            records = [record for record in records if record.state == state]
        return records[:limit]

    async def get_run(self, run_id: str) -> RunRecord:
        """One run with its steps (times, summaries) and, while it runs, the step in progress."""
        status = await DBOS.get_workflow_status_async(run_id)
        if status is None or status.name != WORKFLOW_NAME:
            raise RunNotFound(f"no run {run_id}")
        record = _record(status)
        steps = await DBOS.list_workflow_steps_async(run_id)
        record.steps = [_step_record(step) for step in steps if not step["function_name"].startswith("DBOS.")]
        if record.state in (RunState.QUEUED, RunState.RUNNING):
            current = await DBOS.get_event_async(run_id, CURRENT_STEP_EVENT, timeout_seconds=0)
            done = len(record.steps)
            announced = sum(1 for step in steps if step["function_name"] == "DBOS.setEvent")
            if isinstance(current, dict) and announced > done:
                record.steps.append(
                    StepRecord(
                        name=str(current["name"]), status="running", started_at=current.get("started_at")
                    )
                )
        return record

    async def cancel(self, run_id: str) -> RunRecord:
        """Cancel a queued or running run; its agent is stopped within seconds, its worktree kept."""
        record = await self.get_run(run_id)
        if record.state not in (RunState.QUEUED, RunState.RUNNING):
            raise RunConflict(
                f"run {run_id} is {record.state.value}; only queued or running runs can be cancelled"
            )
        await DBOS.cancel_workflow_async(run_id)
        log.info("run cancelled", ticket=record.ticket, run_id=run_id)
        if record.input is not None:
            result = RunResult(
                run_id=run_id, ticket=record.ticket, state=RunState.CANCELLED, reason="cancelled"
            )
            try:
                await self.pipeline.parts.reporter.report(record.input.ticket, result)
            except Exception as exc:
                log.warning("report failed", run_id=run_id, error=str(exc))
        return await self.get_run(run_id)

    async def retry(self, run_id: str) -> Submission:
        """Start a new run of a failed or cancelled run's ticket, on its branch and its agent session."""
        record = await self.get_run(run_id)
        if record.state not in (RunState.FAILED, RunState.CANCELLED) or record.input is None:
            raise RunConflict(
                f"run {run_id} is {record.state.value}; only failed or cancelled runs can be retried"
            )
        session_id = record.result.session_id if record.result else None
        for step in record.steps:
            if step.name == StepName.PREPARE_WORKSPACE.value and step.output.get("session_id"):
                session_id = str(step.output["session_id"])
        new_id = f"{record.input.ticket.key.lower()}-r{uuid.uuid4().hex[:12]}"
        return await self._enqueue(record.input.ticket, new_id, session_id=session_id, retry_of=run_id)


# --- run records for the runs API ------------------------------------------------------------------


class StepRecord(BaseModel):
    """One step of a run as a person sees it."""

    name: str
    status: str
    started_at: float | None = None
    ended_at: float | None = None
    seconds: float | None = None
    summary: str = ""
    output: dict[str, Any] = Field(default_factory=dict, exclude=True)


class RunRecord(BaseModel):
    """A run as the runs API shows it."""

    run_id: str
    ticket: str
    state: RunState
    created_at: float | None = None
    updated_at: float | None = None
    replica: str | None = None
    reason: str = ""
    pr_url: str | None = None
    cost_usd: float = 0.0
    turns: int = 0
    retry_of: str | None = None
    steps: list[StepRecord] = Field(default_factory=list)
    result: RunResult | None = None
    input: RunInput | None = Field(default=None, exclude=True)


_DBOS_STATUS_FOR = {
    RunState.QUEUED: "ENQUEUED",
    RunState.RUNNING: "PENDING",
    RunState.CANCELLED: "CANCELLED",
}
_FINAL_STATES = {
    RunState.PR_OPENED, RunState.PUSHED, RunState.NO_CHANGES, RunState.DRY_RUN, RunState.FAILED,
    RunState.QUARANTINED,
}  # fmt: skip


def _seconds(epoch_ms: int | None) -> float | None:
    return epoch_ms / 1000 if epoch_ms else None


def _record(status: Any) -> RunRecord:
    """A RunRecord from a DBOS workflow status."""
    run_input = None
    args = (status.input or {}).get("args") if isinstance(status.input, dict) else None
    if args:
        run_input = RunInput.model_validate(args[0])
    result = RunResult.model_validate(status.output) if isinstance(status.output, dict) else None
    state = {
        "ENQUEUED": RunState.QUEUED,
        "DELAYED": RunState.QUEUED,
        "PENDING": RunState.RUNNING,
        "CANCELLED": RunState.CANCELLED,
    }.get(status.status, RunState.FAILED)
    reason = ""
    if status.status == "SUCCESS" and result is not None:
        state, reason = result.state, result.reason
    elif status.status == "CANCELLED":
        reason = "cancelled (by request or RUN_TIMEOUT)"
    elif state is RunState.FAILED:
        reason = f"the run stopped: {status.error or status.status}"
    ticket = run_input.ticket.key if run_input else status.workflow_id.split("-d")[0].upper()
    return RunRecord(
        run_id=status.workflow_id,
        ticket=ticket,
        state=state,
        created_at=_seconds(status.created_at),
        updated_at=_seconds(status.updated_at),
        replica=status.executor_id,
        reason=reason,
        pr_url=result.pr_url if result else None,
        cost_usd=result.cost_usd if result else 0.0,
        turns=result.turns if result else 0,
        retry_of=run_input.retry_of if run_input else None,
        result=result,
        input=run_input,
    )


def _step_record(step: Any) -> StepRecord:
    output = step.get("output") if isinstance(step.get("output"), dict) else {}
    started, ended = _seconds(step.get("started_at_epoch_ms")), _seconds(step.get("completed_at_epoch_ms"))
    failed = step.get("error") is not None or output.get("ok") is False
    status = "failed" if failed else "ok"
    if not failed and isinstance(output.get("check"), dict):
        status = str(output["check"].get("status", status))
    elif not failed and isinstance(output.get("review"), dict):
        status = str(output["review"].get("verdict", status))
    elif not failed and isinstance(output.get("agent"), dict):
        status = "ok" if output["agent"].get("outcome") == "success" else str(output["agent"].get("outcome"))
    return StepRecord(
        name=step["function_name"],
        status=status,
        started_at=started,
        ended_at=ended,
        seconds=round(ended - started, 3) if started and ended else None,
        summary=str(output.get("summary") or step.get("error") or ""),
        output=output,
    )
