"""Logs are one JSON object per line, and no secret value ever appears in them."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.logger import configure_logging, get_logger
from app.main import create_app
from tests.fakes.runner import RecordingRunner

SECRETS = {
    "webhook_secret": "webhook-secret-value-1234567890",
    "anthropic_api_key": "sk-ant-secret-value-abcdef",
    "gh_token": "ghp_secretvalue0123456789",
    "api_token": "api-token-secret-value-xyz",
    "jira_api_token": "jira-token-secret-value",
    "langfuse_secret_key": "sk-lf-secret-value",
}


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    configure_logging("DEBUG", stream=stream)
    yield stream
    root.handlers[:] = before[0]
    root.setLevel(before[1])


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_a_log_line_is_one_json_object_with_fields(captured: io.StringIO) -> None:
    get_logger("test").info("run started", ticket="PROJ-1", run_id="r1", step="implement")
    (entry,) = lines(captured)
    assert entry["message"] == "run started"
    assert entry["level"] == "info"
    assert entry["ticket"] == "PROJ-1" and entry["run_id"] == "r1" and entry["step"] == "implement"
    assert "time" in entry


def test_exceptions_are_one_line_too(captured: io.StringIO) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        get_logger("test").exception("failed", ticket="PROJ-2")
    (entry,) = lines(captured)
    assert "ValueError: boom" in str(entry["error"])


def test_no_secret_reaches_the_logs(captured: io.StringIO, make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(**SECRETS, repo_url="https://github.com/acme/app.git")
    runner = RecordingRunner()
    with TestClient(create_app(settings, runner.factory())) as client:
        token = {"X-Webhook-Token": SECRETS["webhook_secret"]}
        client.post("/webhook/jira", json={"key": "PROJ-1", "summary": "x"}, headers=token)
        client.post("/webhook/jira", json={"key": "PROJ-1", "summary": "x"}, headers=token)
        client.post("/webhook/jira", json={"key": "PROJ-2"}, headers=token)
        client.post(
            "/webhook/jira", json={"key": "PROJ-3", "summary": "x"}, headers={"X-Webhook-Token": "wrong"}
        )
    log = get_logger("test")
    log.info("a careless line", value=SECRETS["gh_token"], nested={"k": [SECRETS["anthropic_api_key"]]})
    log.warning("token in message " + SECRETS["api_token"])
    text = captured.getvalue()
    assert len(lines(captured)) >= 5
    assert "[redacted]" in text
    for secret in SECRETS.values():
        assert secret not in text
