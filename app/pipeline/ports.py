"""What the pipeline needs of its collaborators: small Protocols, and the Collaborators that hold them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from app.models import AgentResult, CheckResult, Gate, ReviewResult, RunResult, Ticket


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
