"""POST /webhook/jira: authenticate, classify, validate, hand the ticket to the runner, answer at once."""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import HTTPException, Request, Response, status
from fastapi.responses import JSONResponse

from app.errors import InvalidTicket
from app.intake.jira import Ignored, TriggerRules, interpret
from app.logger import get_logger
from app.web.dependencies import RunnerDep, SettingsDep
from app.web.security import (
    SIGNATURE_HEADER,
    TOKEN_HEADER,
    declared_length_fits,
    read_body,
    signature_matches,
    token_matches,
    unauthorized,
)

log = get_logger(__name__)

DELIVERY_HEADER = "X-Atlassian-Webhook-Identifier"
_DELIVERY_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

_FIELDS = {
    "summary": "Add a /version endpoint",
    "description": "Return the package version as JSON.\n\nh3. Acceptance\n* GET /version answers 200",
    "project": {"key": "PROJ", "name": "Project"},
    "issuetype": {"name": "Story"},
    "labels": ["auto-code"],
    "reporter": {"displayName": "Alex Doe"},
}
EXAMPLES: dict[str, dict[str, Any]] = {
    "automation_jira_format": {
        "summary": "Jira Automation, 'Issue data (Jira format)'",
        "value": {
            "issue": {
                "id": "10001",
                "key": "PROJ-1",
                "self": "https://acme.atlassian.net/rest/api/2/issue/10001",
                "fields": _FIELDS,
            }
        },
    },
    "automation_format": {
        "summary": "Jira Automation, 'Issue data (Automation format)': the issue at top level",
        "value": {
            "id": 10001,
            "key": "PROJ-1",
            "self": "https://acme.atlassian.net/rest/api/2/issue/10001",
            "fields": _FIELDS,
        },
    },
    "native_issue_created": {
        "summary": "Native Jira webhook, jira:issue_created",
        "value": {
            "timestamp": 1767225600000,
            "webhookEvent": "jira:issue_created",
            "issue_event_type_name": "issue_created",
            "user": {"accountId": "5b10a2844c20165700ede21g", "displayName": "Alex Doe"},
            "issue": {
                "id": "10001",
                "key": "PROJ-1",
                "self": "https://acme.atlassian.net/rest/api/2/issue/10001",
                "fields": _FIELDS,
            },
        },
    },
    "native_label_added": {
        "summary": "Native Jira webhook, jira:issue_updated adding the trigger label",
        "value": {
            "webhookEvent": "jira:issue_updated",
            "issue": {"key": "PROJ-1", "fields": _FIELDS},
            "changelog": {"items": [{"field": "labels", "fromString": "", "toString": "auto-code"}]},
        },
    },
    "custom": {
        "summary": "Custom data with smart values",
        "value": {"key": "PROJ-1", "summary": "Add a /version endpoint", "description": "Details..."},
    },
}
OPENAPI_EXTRA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"type": "object"}, "examples": EXAMPLES}},
    },
    "parameters": [
        {
            "name": TOKEN_HEADER,
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": "Shared secret (WEBHOOK_SECRET), for Jira Automation.",
        },
        {
            "name": SIGNATURE_HEADER,
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": "sha256=<hex HMAC-SHA256 of the raw body>, for native webhooks with a secret.",
        },
    ],
}


async def _authenticated_body(request: Request, settings: SettingsDep) -> bytes:
    """Read the body within the size limit, having checked the token or the body's signature."""
    limit = settings.max_body_bytes
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
    declared_length_fits(request, limit)
    token = request.headers.get(TOKEN_HEADER)
    if secret is not None and token is not None and not token_matches(token, secret):
        raise unauthorized(f"wrong {TOKEN_HEADER}")
    body = await read_body(request, limit)
    if secret is None or token is not None:
        return body
    signature = request.headers.get(SIGNATURE_HEADER)
    if signature is None:
        raise unauthorized(f"missing {TOKEN_HEADER} or {SIGNATURE_HEADER}")
    if not signature_matches(body, signature, secret):
        raise unauthorized(f"{SIGNATURE_HEADER} does not match the body")
    return body


def _delivery_id(request: Request) -> str | None:
    value = request.headers.get(DELIVERY_HEADER)
    if value is None:
        return None
    if not _DELIVERY_ID.fullmatch(value):
        log.warning("delivery id ignored: unexpected form", length=len(value))
        return None
    return value


def _parse_json(body: bytes) -> object:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "body is not valid JSON") from None


async def webhook(request: Request, response: Response, settings: SettingsDep, runner: RunnerDep) -> Any:
    """Take a ticket from Jira Automation or a native Jira webhook; the work happens after the answer."""
    body = _parse_json(await _authenticated_body(request, settings))
    rules = TriggerRules(
        trigger_label=settings.trigger_label,
        projects=frozenset(project.upper() for project in settings.jira_projects),
    )
    try:
        outcome = interpret(body, rules)
    except InvalidTicket as exc:
        log.info("webhook rejected", problems=exc.problems)
        return JSONResponse(
            {"error": "no usable ticket in the body", "problems": exc.problems},
            status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        )
    if isinstance(outcome, Ignored):
        log.info("webhook ignored", reason=outcome.reason)
        response.status_code = status.HTTP_200_OK
        return {"status": "ignored", "reason": outcome.reason}
    ticket = outcome.ticket
    submission = await runner.submit(ticket, _delivery_id(request))
    state = "duplicate" if submission.duplicate else "accepted"
    log.info("webhook " + state, ticket=ticket.key, run_id=submission.run_id, event=outcome.event)
    response.status_code = status.HTTP_202_ACCEPTED
    return {"status": state, "ticket": ticket.key, "run_id": submission.run_id}
