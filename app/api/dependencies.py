"""Annotated providers that hand the routes what the lifespan built once."""

from __future__ import annotations

from typing import Annotated, Protocol

from fastapi import Depends, HTTPException, Request, status

from app.config import Settings
from app.models import Submission, Ticket


class TicketRunner(Protocol):
    """What the webhook needs from the runner: take a ticket durably and say which run carries it."""

    async def submit(self, ticket: Ticket, delivery_id: str | None) -> Submission: ...


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


SettingsDep = Annotated[Settings, Depends(get_settings)]
RunnerDep = Annotated[TicketRunner, Depends(get_runner)]
