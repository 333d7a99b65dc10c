"""Settings: defaults, parsing, and production fail-fast naming every missing or weak variable."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import SecretStr

from app.config import Settings, load_settings
from app.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PRODUCTION_REQUIRED = ["REPO_URL", "ANTHROPIC_API_KEY", "GH_TOKEN", "WEBHOOK_SECRET", "API_TOKEN"]
GOOD_PRODUCTION = {
    "node_env": "production",
    "repo_url": "https://github.com/acme/app.git",
    "anthropic_api_key": "sk-ant-test",
    "gh_token": "ghp_test",
    "webhook_secret": "a" * 16,
    "api_token": "b" * 16,
}


def test_defaults_of_the_original_design() -> None:
    settings = Settings()
    assert settings.claude_code_api_port == 3001
    assert settings.node_env == "development"
    assert settings.max_body_bytes == 1024 * 1024
    assert settings.rate_limit == "10/minute"
    assert settings.dry_run is False
    assert settings.worktree_ttl == timedelta(days=7)
    assert settings.max_concurrent_tickets == 2


def test_environment_variables_are_read_by_their_upper_case_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLAUDE_CODE_API_PORT", "4000")
    monkeypatch.setenv("JIRA_PROJECTS", "PROJ, OPS")
    monkeypatch.setenv("DRY_RUN", "true")
    monkeypatch.setenv("WORKTREE_TTL", "36h")
    monkeypatch.setenv("GH_TOKEN", "ghp_x")
    settings = Settings()
    assert settings.claude_code_api_port == 4000
    assert settings.jira_projects == ["PROJ", "OPS"]
    assert settings.dry_run is True
    assert settings.worktree_ttl == timedelta(hours=36)
    assert isinstance(settings.gh_token, SecretStr)
    assert "ghp_x" not in repr(settings)


def test_production_names_every_missing_variable_in_one_message() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(node_env="production")
    for name in PRODUCTION_REQUIRED:
        assert name in str(info.value)


@pytest.mark.parametrize("name", PRODUCTION_REQUIRED)
def test_production_names_each_variable_alone(name: str) -> None:
    values = {**GOOD_PRODUCTION, name.lower(): None}
    with pytest.raises(ConfigError) as info:
        load_settings(**values)
    assert name in str(info.value)
    for other in set(PRODUCTION_REQUIRED) - {name}:
        assert other not in str(info.value)


@pytest.mark.parametrize("name", ["WEBHOOK_SECRET", "API_TOKEN"])
def test_production_refuses_a_short_secret(name: str) -> None:
    with pytest.raises(ConfigError, match=f"{name} must be at least 16"):
        load_settings(**{**GOOD_PRODUCTION, name.lower(): "short"})


def test_production_with_everything_set_loads() -> None:
    assert load_settings(**GOOD_PRODUCTION).is_production


def test_invalid_values_are_named_without_their_values() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(claude_code_api_port="not-a-port", rate_limit="often", worktree_ttl="soon")
    message = str(info.value)
    assert "CLAUDE_CODE_API_PORT" in message and "RATE_LIMIT" in message and "WORKTREE_TTL" in message


def test_blank_secret_counts_as_unset() -> None:
    assert Settings(webhook_secret="  ").webhook_secret is None


def test_the_command_fails_fast_in_production(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "NODE_ENV": "production", "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "app"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    for name in PRODUCTION_REQUIRED:
        assert name in result.stderr


def test_env_example_documents_every_setting() -> None:
    documented = (ROOT / ".env.example").read_text()
    for name in Settings.model_fields:
        assert f"{name.upper()}=" in documented, f"{name.upper()} is not in .env.example"


def test_the_service_listens_on_loopback_unless_in_production_or_told() -> None:
    assert Settings().bind_host == "127.0.0.1"
    assert Settings(**GOOD_PRODUCTION).bind_host == "0.0.0.0"
    assert Settings(host="10.0.0.5").bind_host == "10.0.0.5"
