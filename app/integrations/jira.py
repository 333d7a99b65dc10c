"""Report-back to Jira: the comment that tells a ticket how its run ended, posted over REST v2."""

from __future__ import annotations

import httpx

from app.logger import get_logger
from app.models import RunResult, Ticket

log = get_logger(__name__)

COMMENT_LIMIT = 30_000


def comment_text(result: RunResult) -> str:
    """The plain-text comment that tells the ticket how its run ended."""
    lines = [f"auto-code run {result.run_id}: {result.state.value.replace('_', ' ')}"]
    if result.pr_url:
        lines.append(f"Pull request: {result.pr_url}")
    if result.failed_step:
        lines.append(f"Failed at: {result.failed_step.value}")
    if result.reason:
        lines.append(f"Reason: {result.reason}")
    if result.removal_hint:
        lines.append(f"Worktree kept for inspection; remove it with: {result.removal_hint}")
    if result.summary:
        lines.append(f"\nWhat the agent did:\n{result.summary}")
    if result.evidence:
        lines.append("Evidence: " + "; ".join(result.evidence))
    lines.append(f"\nTurns: {result.turns}, cost: ${result.cost_usd:.2f}")
    if result.network_summary():
        lines.append(result.network_summary())
    return "\n".join(lines)[:COMMENT_LIMIT]


class JiraReporter:
    """Posts the run's outcome as a comment on the ticket (REST v2, plain text, basic auth)."""

    def __init__(self, client: httpx.AsyncClient, base_url: str, email: str, token: str) -> None:
        self._client = client
        self._base_url = base_url.rstrip("/")
        self._auth = httpx.BasicAuth(email, token)

    async def report(self, ticket: Ticket, result: RunResult) -> None:
        """Comment on the ticket; raise on failure so the caller can log it."""
        url = f"{self._base_url}/rest/api/2/issue/{ticket.key}/comment"
        response = await self._client.post(
            url, json={"body": comment_text(result)}, auth=self._auth, timeout=30
        )
        if response.status_code >= 300:
            raise RuntimeError(f"Jira answered {response.status_code} to the comment: {response.text[:300]}")
        log.info("ticket commented", ticket=ticket.key, run_id=result.run_id)


class LogReporter:
    """Used when no Jira credentials are set: the outcome goes to the log only."""

    async def report(self, ticket: Ticket, result: RunResult) -> None:
        """Log the outcome that a Jira comment would carry."""
        log.info("run outcome (no Jira credentials set)", ticket=ticket.key, run_id=result.run_id)
