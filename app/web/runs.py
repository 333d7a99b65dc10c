"""The runs API: list, show, cancel and retry runs (Bearer API_TOKEN)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status

from app.models import RunState
from app.web.dependencies import RunsDep, SettingsDep
from app.web.security import forwarding_header, token_matches

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def require_api_token(request: Request, settings: SettingsDep) -> None:
    """Bearer API_TOKEN; with none set (development only) the API answers direct loopback callers alone."""
    if settings.api_token is None:
        if forwarded := forwarding_header(request):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                f"this request came through a proxy or tunnel ({forwarded}); "
                "set API_TOKEN to use the runs API remotely",
            )
        if request.client is None or request.client.host not in LOOPBACK:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, "API_TOKEN is not set: the runs API is loopback-only"
            )
        return
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token_matches(
        presented.strip(), settings.api_token.get_secret_value()
    ):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or wrong Bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )


router = APIRouter(prefix="/runs", tags=["runs"], dependencies=[Depends(require_api_token)])


@router.get("")
async def list_runs(
    runs: RunsDep,
    ticket: Annotated[str | None, Query(max_length=41, pattern=r"^[A-Za-z][A-Za-z0-9_]*-\d+$")] = None,
    state: RunState | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> dict[str, Any]:
    """Runs, newest first, optionally of one ticket and in one state."""
    records = await runs.list_runs(ticket=ticket, state=state, limit=limit)
    return {"runs": [record.model_dump(mode="json", exclude={"steps", "result"}) for record in records]}


@router.get("/{run_id}")
async def show_run(run_id: str, runs: RunsDep) -> dict[str, Any]:
    """One run: its steps with times and summaries, cost, turns, PR URL, error."""
    return (await runs.get_run(run_id)).model_dump(mode="json")


@router.post("/{run_id}/cancel", status_code=status.HTTP_202_ACCEPTED)
async def cancel_run(run_id: str, runs: RunsDep) -> dict[str, Any]:
    """Cancel a queued or running run; its agent stops within seconds and its worktree is kept."""
    return (await runs.cancel(run_id)).model_dump(mode="json")


@router.post("/{run_id}/retry", status_code=status.HTTP_202_ACCEPTED)
async def retry_run(run_id: str, runs: RunsDep) -> dict[str, Any]:
    """Start a new run linked to a failed or cancelled one, on its branch and its agent session."""
    submission = await runs.retry(run_id)
    state = "duplicate" if submission.duplicate else "accepted"
    return {"status": state, "run_id": submission.run_id, "retry_of": run_id}
