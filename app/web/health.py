"""GET /health: the process is up and serving."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: answers while the process serves HTTP."""
    return {"status": "ok"}
