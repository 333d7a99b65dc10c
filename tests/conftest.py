"""Shared fixtures: settings isolated from the developer's environment, apps with a recording runner."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.fakes.runner import RecordingRunner

WEBHOOK_SECRET = "test-webhook-secret-0123456789"


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No variable of the developer's shell or .env may change what a test's settings are."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setitem(Settings.model_config, "env_file", None)


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Settings for a test: a workspace in tmp_path, a webhook secret, a generous rate limit."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "workspace_dir": tmp_path / "workspace",
            "webhook_secret": WEBHOOK_SECRET,
            "rate_limit": "1000/minute",
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def runner() -> RecordingRunner:
    return RecordingRunner()


@pytest.fixture
def client_for(runner: RecordingRunner) -> Iterator[Callable[[Settings], TestClient]]:
    """Start an app (lifespan included) with a recording runner for the given settings."""
    clients: list[TestClient] = []

    def start(settings: Settings) -> TestClient:
        client = TestClient(create_app(settings, runner.factory()), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(
    client_for: Callable[[Settings], TestClient], make_settings: Callable[..., Settings]
) -> TestClient:
    return client_for(make_settings())


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")
