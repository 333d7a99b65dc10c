"""A runner that records submissions and answers duplicates like the durable one does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from app.config import Settings
from app.models import Submission, Ticket


class RecordingRunner:
    """Keeps every ticket it was handed; a key already taken is answered as a duplicate."""

    def __init__(self) -> None:
        self.submitted: list[tuple[Ticket, str | None]] = []
        self._runs: dict[str, str] = {}
        self._lock = asyncio.Lock()

    async def submit(self, ticket: Ticket, delivery_id: str | None) -> Submission:
        async with self._lock:
            if ticket.key in self._runs:
                return Submission(run_id=self._runs[ticket.key], duplicate=True)
            run_id = f"run-{len(self._runs) + 1}"
            self._runs[ticket.key] = run_id
            self.submitted.append((ticket, delivery_id))
            return Submission(run_id=run_id)

    async def list_runs(self, **filters: object) -> list[object]:
        """No run records are kept: the runs API answers with an empty list."""
        return []

    def factory(self):  # type: ignore[no-untyped-def]
        """A runner_factory for create_app that hands out this instance."""

        @asynccontextmanager
        async def start(settings: Settings) -> AsyncIterator[RecordingRunner]:
            yield self

        return start
