"""Settings: every environment variable the service reads, validated once at startup."""

from __future__ import annotations

import ipaddress
import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import limits
from pydantic import BeforeValidator, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.errors import ConfigError

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: Any) -> Any:
    """Accept `90`, `90s`, `15m`, `2h`, `7d` (and timedelta or numbers) as a duration."""
    if isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if not match:
            raise ValueError("expected a duration such as 90s, 15m, 2h or 7d")
        return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])
    if isinstance(value, int | float):
        return timedelta(seconds=value)
    return value


def split_list(value: Any) -> Any:
    """Accept a comma- or space-separated string as a list."""
    if isinstance(value, str):
        return [item for item in re.split(r"[,\s]+", value) if item]
    return value


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
StrList = Annotated[list[str], NoDecode, BeforeValidator(split_list)]

MIN_SECRET_LENGTH = 16
# What a build's setup usually installs from: PyPI and npm (EGRESS_ALLOW_SETUP replaces the list).
DEFAULT_SETUP_HOSTS = ("pypi.org", "files.pythonhosted.org", "registry.npmjs.org", "registry.yarnpkg.com")
_HOST_NAME = re.compile(r"(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*")


class Settings(BaseSettings):
    """One object with every setting; field FOO is read from the environment variable FOO."""

    model_config = SettingsConfigDict(
        env_file=".env", env_ignore_empty=True, extra="ignore", case_sensitive=False
    )

    # --- service -------------------------------------------------------------------------------
    claude_code_api_port: int = Field(3001, ge=1, le=65535)
    host: str | None = None
    node_env: Literal["development", "production", "test"] = "development"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    workspace_dir: Path = Path("workspace")

    # --- intake --------------------------------------------------------------------------------
    webhook_secret: SecretStr | None = None
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    rate_limit: str = "10/minute"
    trust_proxy_headers: bool = False
    trigger_label: str | None = None
    jira_projects: StrList = Field(default_factory=list)

    # --- repository and git --------------------------------------------------------------------
    repo_url: str | None = None
    repo_dir: Path | None = None
    base_branch: str | None = None
    max_file_bytes: int = Field(5 * 1024 * 1024, ge=1)
    git_author_name: str = "auto-code"
    git_author_email: str = "auto-code@users.noreply.github.com"
    worktree_ttl: Duration = timedelta(days=7)
    worktree_pool_size: int = Field(1, ge=0, le=16)
    worktree_pool_refresh: Duration = timedelta(minutes=1)
    git_timeout: Duration = timedelta(minutes=10)

    # --- agent ---------------------------------------------------------------------------------
    anthropic_api_key: SecretStr | None = None
    anthropic_base_url: str | None = None
    claude_model: str | None = None
    max_turns: int = Field(50, ge=1)
    review_max_turns: int = Field(10, ge=1)
    max_budget_usd: float = Field(5.0, gt=0)
    agent_phase_timeout: Duration = timedelta(minutes=30)
    claude_code_max_retries: int = Field(3, ge=0)
    api_timeout_ms: int = Field(120_000, ge=1000)
    agent_allowed_commands: StrList = Field(default_factory=list)
    agent_env_passthrough: StrList = Field(default_factory=list)
    allow_ci_config_writes: bool = False
    sandbox: Literal["auto", "bwrap", "off"] = "auto"

    # --- the fence: what sandboxed processes may reach through the egress proxy -----------------
    # Exact host names (no wildcards, no suffix match); a phase's list is all it may reach.
    egress_allow_agent: StrList = Field(default_factory=list)
    egress_allow_setup: StrList = Field(default_factory=lambda: list(DEFAULT_SETUP_HOSTS))
    egress_allow_checks: StrList = Field(default_factory=list)
    egress_allow_ports: StrList = Field(default_factory=lambda: ["80", "443"])
    # Networks a listed name may resolve into although they are not public (an internal mirror).
    egress_trusted_nets: StrList = Field(default_factory=list)
    egress_tls_intercept: bool = False

    # --- pipeline ------------------------------------------------------------------------------
    dry_run: bool = False
    run_review: bool = True
    run_lint: bool = True
    run_tests: bool = True
    max_fix_rounds: int = Field(2, ge=0)
    setup_command: str | None = None
    lint_command: str | None = None
    test_command: str | None = None
    check_timeout: Duration = timedelta(minutes=15)
    run_timeout: Duration = timedelta(hours=2)
    max_concurrent_tickets: int = Field(2, ge=1)
    replica_concurrency: int | None = Field(None, ge=1)
    queue_poll_interval: Duration = timedelta(seconds=1)
    database_url: SecretStr | None = None
    replica_id: str = "local"

    # --- GitHub --------------------------------------------------------------------------------
    gh_token: SecretStr | None = None
    gh_enterprise_token: SecretStr | None = None
    gh_host: str | None = None
    github_repo: str | None = Field(None, pattern=r"^[\w.-]+/[\w.-]+$")

    # --- Jira report-back ----------------------------------------------------------------------
    jira_base_url: str | None = None
    jira_email: str | None = None
    jira_api_token: SecretStr | None = None

    # --- operations ----------------------------------------------------------------------------
    api_token: SecretStr | None = None
    min_free_disk_mb: int = Field(1024, ge=0)
    shutdown_drain: Duration = timedelta(seconds=2)
    run_retention_days: int = Field(30, ge=1)

    # --- tracing -------------------------------------------------------------------------------
    langfuse_public_key: SecretStr | None = None
    langfuse_secret_key: SecretStr | None = None
    langfuse_base_url: str | None = None

    @field_validator("anthropic_base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("expected an http(s) URL")
        return value

    @field_validator("egress_allow_agent", "egress_allow_setup", "egress_allow_checks")
    @classmethod
    def _exact_hosts(cls, value: list[str]) -> list[str]:
        hosts = []
        for item in value:
            host = item.strip().lower().rstrip(".")
            if not _HOST_NAME.fullmatch(host):
                raise ValueError(
                    f"{item!r} is not a host name: list exact names such as pypi.org "
                    "(no scheme, port, path or wildcard)"
                )
            hosts.append(host)
        return hosts

    @field_validator("egress_allow_ports")
    @classmethod
    def _ports(cls, value: list[str]) -> list[str]:
        for item in value:
            if not item.isdigit() or not 1 <= int(item) <= 65535:
                raise ValueError(f"{item!r} is not a port number (1-65535)")
        return value

    @field_validator("egress_trusted_nets")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError as exc:
                raise ValueError(f"{item!r} is not a network such as 10.20.0.0/16") from exc
        return value

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit_parses(cls, value: str) -> str:
        try:
            limits.parse_many(value)
        except ValueError as exc:
            raise ValueError("expected a limit such as 10/minute") from exc
        return value

    @field_validator(
        "webhook_secret",
        "anthropic_api_key",
        "gh_token",
        "gh_enterprise_token",
        "api_token",
        "jira_api_token",
        "database_url",
        "langfuse_public_key",
        "langfuse_secret_key",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def bind_host(self) -> str:
        """HOST, else loopback in development and every interface in production (the container)."""
        if self.host:
            return self.host
        return "0.0.0.0" if self.is_production else "127.0.0.1"  # noqa: S104 - behind the tunnel

    @property
    def is_production(self) -> bool:
        return self.node_env == "production"

    @property
    def github_token(self) -> SecretStr | None:
        """The token for git push and gh: GH_TOKEN, else GH_ENTERPRISE_TOKEN (GitHub Enterprise)."""
        return self.gh_token or self.gh_enterprise_token

    def secret_values(self) -> list[str]:
        """Every secret value set, so logs can redact them."""
        values = []
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr) and value.get_secret_value():
                values.append(value.get_secret_value())
        return values

    def production_problems(self) -> list[str]:
        """Name every variable that production needs and lacks, or has too weak."""
        problems = []
        if not self.repo_url:
            problems.append("REPO_URL is required")
        if self.anthropic_api_key is None:
            problems.append("ANTHROPIC_API_KEY is required")
        if self.github_token is None:
            problems.append("GH_TOKEN is required (or GH_ENTERPRISE_TOKEN with GH_HOST)")
        for name in ("webhook_secret", "api_token"):
            value: SecretStr | None = getattr(self, name)
            if value is None:
                problems.append(f"{name.upper()} is required")
            elif len(value.get_secret_value()) < MIN_SECRET_LENGTH:
                problems.append(f"{name.upper()} must be at least {MIN_SECRET_LENGTH} characters")
        return problems


def load_settings(**overrides: Any) -> Settings:
    """Read the environment (and .env) into Settings, or raise ConfigError naming every bad variable."""
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            variable = str(error["loc"][0]).upper() if error["loc"] else "settings"
            problems.append(f"{variable}: {error['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
    if settings.is_production and (problems := settings.production_problems()):
        raise ConfigError("invalid configuration for NODE_ENV=production: " + "; ".join(problems))
    return settings
