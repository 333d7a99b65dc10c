"""The steps of a run over the collaborators: what each does, returned as the result the workflow records."""

from __future__ import annotations

import contextlib
import uuid
from typing import Any

from pydantic import BaseModel

from app.logger import get_logger
from app.models import CheckResult, Gate, PipelineOptions, RunResult, RunState, Ticket
from app.pipeline.ports import ChangesLike, Collaborators

log = get_logger(__name__)


# --- records ------------------------------------------------------------------------------------


class RunInput(BaseModel):
    """What a run is started with; fixed at acceptance so a recovered run behaves the same."""

    run_id: str
    ticket: Ticket
    options: PipelineOptions
    deadline: float
    session_id: str | None = None
    retry_of: str | None = None


def _names(changes: ChangesLike) -> list[str]:
    return [change.path for change in changes.files]


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
