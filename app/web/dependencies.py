"""Annotated providers that hand the routes what the lifespan built once."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Protocol

from fastapi import Depends, HTTPException, Request, status

from app.config import Settings
from app.models import RunState, Submission, Ticket

if TYPE_CHECKING:
    from app.pipeline.runner import RunRecord


class TicketRunner(Protocol):
    """What the webhook needs from the runner: take a ticket durably and say which run carries it."""

    async def submit(self, ticket: Ticket, delivery_id: str | None) -> Submission: ...


class RunsPort(Protocol):
    """What the runs API needs: look at runs, cancel one, retry one."""

    async def list_runs(
        self, *, ticket: str | None = None, state: RunState | None = None, limit: int = 50
    ) -> list[RunRecord]: ...
    async def get_run(self, run_id: str) -> RunRecord: ...
    async def cancel(self, run_id: str) -> RunRecord: ...
    async def retry(self, run_id: str) -> Submission: ...


def get_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings


def get_runner(request: Request) -> TicketRunner:
    """The runner the lifespan started; 503 while the service starts or drains."""
    runner: TicketRunner | None = getattr(request.app.state, "runner", None)
    if runner is None or getattr(request.app.state, "draining", False):
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "service is not accepting tickets right now")
    return runner


def get_runs(request: Request) -> RunsPort:
    """The runner, for looking at runs; available while draining too."""
    runs: RunsPort | None = getattr(request.app.state, "runs", None)
    if runs is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the runner is not running")
    return runs


SettingsDep = Annotated[Settings, Depends(get_settings)]
RunsDep = Annotated[RunsPort, Depends(get_runs)]
RunnerDep = Annotated[TicketRunner, Depends(get_runner)]
