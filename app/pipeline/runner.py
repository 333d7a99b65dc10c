"""The runner: intake onto the durable queue, the DBOS lifecycle, and the run records of the runs API."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from dbos import DBOS, DBOSConfig, SetEnqueueOptions, SetWorkflowID, SetWorkflowTimeout
from dbos._error import DBOSWorkflowIDInUseError
from dbos._serialization import DBOSPortableJSON
from pydantic import BaseModel, Field

from app.errors import RunConflict, RunNotFound
from app.logger import get_logger
from app.models import PipelineOptions, RunResult, RunState, StepName, Submission, Ticket
from app.pipeline.ports import Collaborators
from app.pipeline.steps import Pipeline, RunInput
from app.pipeline.workflow import (
    CURRENT_STEP_EVENT,
    QUEUE_NAME,
    WORKFLOW_NAME,
    WORKFLOW_VERSION,
    _ticket_run,
    use_pipeline,
)

log = get_logger(__name__)


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
        if self.pipeline.parts.before_start is not None:
            await self.pipeline.parts.before_start()
        use_pipeline(self.pipeline)
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
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
        DBOS.destroy(workflow_completion_timeout_sec=0)
        use_pipeline(None)

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
