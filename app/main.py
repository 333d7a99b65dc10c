"""create_app(settings): the FastAPI app, its error shapes and the lifespan that builds every service once."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from slowapi import Limiter
from slowapi.errors import RateLimitExceeded

from app.agent.claude_code import AgentConfig, ClaudeCode
from app.agent.model_proxy import ModelProxy
from app.config import Settings
from app.errors import RunConflict, RunNotFound
from app.integrations import github
from app.integrations.jira import JiraReporter, LogReporter
from app.isolation import sandbox
from app.isolation.egress import EgressPolicy
from app.isolation.fence import AGENT, CHECKS, SETUP, Fence, FenceConfig, load_key
from app.logger import get_logger, register_secrets
from app.models import PipelineOptions, RunResult, Ticket
from app.pipeline.checks import Checks, ChecksConfig
from app.pipeline.ports import Collaborators, ReporterPort
from app.pipeline.runner import Runner, RunnerConfig
from app.web import health, jira, runs
from app.web.dependencies import TicketRunner
from app.web.security import client_ip
from app.workspace.worktrees import Workspace, WorkspaceConfig

log = get_logger(__name__)

RunnerFactory = Callable[[Settings], AbstractAsyncContextManager[TicketRunner]]


def _error(status_code: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status_code)


def _install_error_handlers(app: FastAPI) -> None:
    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        response = _error(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})
        return response

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return _error(status.HTTP_422_UNPROCESSABLE_CONTENT, "invalid request", problems=problems)

    async def rate_limited(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RateLimitExceeded)
        response = _error(status.HTTP_429_TOO_MANY_REQUESTS, f"rate limit exceeded: {exc.detail}")
        response.headers["Retry-After"] = "60"
        return response

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", path=request.url.path)
        return _error(status.HTTP_500_INTERNAL_SERVER_ERROR, "internal error")

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return _error(status.HTTP_404_NOT_FOUND, str(exc))

    async def conflict(request: Request, exc: Exception) -> JSONResponse:
        return _error(status.HTTP_409_CONFLICT, str(exc))

    app.add_exception_handler(RunNotFound, not_found)
    app.add_exception_handler(RunConflict, conflict)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(RateLimitExceeded, rate_limited)
    app.add_exception_handler(Exception, unexpected)


DEFAULT_ANTHROPIC_URL = "https://api.anthropic.com"


def database_url(settings: Settings) -> str:
    """DATABASE_URL, else the embedded default: a SQLite file under WORKSPACE_DIR."""
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    return f"sqlite:///{settings.workspace_dir.resolve() / 'auto-code.sqlite'}"


def pipeline_options(settings: Settings, open_pr: bool) -> PipelineOptions:
    """The run switches as settings give them now; each run keeps its own copy."""
    return PipelineOptions(
        dry_run=settings.dry_run,
        run_review=settings.run_review,
        run_lint=settings.run_lint,
        run_tests=settings.run_tests,
        max_fix_rounds=settings.max_fix_rounds,
        max_budget_usd=settings.max_budget_usd,
        open_pr=open_pr,
        run_setup=bool(settings.setup_command),
    )


def _check_env(settings: Settings, home: Path) -> dict[str, str]:
    """The environment of lint and test commands: a toolchain's needs, never a service secret."""
    keep = ("PATH", "LANG", "LC_ALL", "TZ", *settings.agent_env_passthrough)
    env = {name: os.environ[name] for name in keep if name in os.environ}
    return {**env, "HOME": str(home), "CI": "true"}


def egress_policies(settings: Settings) -> dict[str, EgressPolicy]:
    """Each sandboxed phase's allowlist, from EGRESS_ALLOW_AGENT|SETUP|CHECKS and the shared limits."""
    ports = frozenset(int(port) for port in settings.egress_allow_ports)
    trusted = tuple(ipaddress.ip_network(net, strict=False) for net in settings.egress_trusted_nets)
    hosts = {
        AGENT: settings.egress_allow_agent,
        SETUP: settings.egress_allow_setup,
        CHECKS: settings.egress_allow_checks,
    }
    return {
        phase: EgressPolicy(allow_hosts=frozenset(names), allow_ports=ports, trusted_nets=trusted)
        for phase, names in hosts.items()
    }


@contextlib.contextmanager
def _bridge_dir() -> Iterator[Path]:
    """A short private directory for the bridges' sockets (a socket path must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="auto-code-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@asynccontextmanager
async def default_runner(settings: Settings) -> AsyncIterator[Runner]:
    """Build every collaborator once from the settings, start the durable runner, stop it at the end."""
    root = settings.workspace_dir.resolve()
    root.mkdir(parents=True, exist_ok=True)
    token = settings.github_token.get_secret_value() if settings.github_token else None
    isolation = sandbox.select(settings.sandbox, root, Path.home(), [Path.cwd() / ".env"])
    workspace = Workspace(
        WorkspaceConfig(
            workspace_dir=root,
            repo_url=settings.repo_url,
            repo_dir=settings.repo_dir.resolve() if settings.repo_dir else None,
            base_branch=settings.base_branch,
            max_file_bytes=settings.max_file_bytes,
            author_name=settings.git_author_name,
            author_email=settings.git_author_email,
            git_timeout=settings.git_timeout.total_seconds(),
            worktree_ttl=settings.worktree_ttl,
            allow_ci_config_writes=settings.allow_ci_config_writes,
            pool_size=settings.worktree_pool_size,
            pool_refresh=settings.worktree_pool_refresh.total_seconds(),
            pool_min_free_mb=settings.min_free_disk_mb,
        ),
        token=token,
    )
    await workspace.startup()
    # The real API key stays in this process: the agent reaches the model through a local proxy that
    # swaps a token issued per phase for the key.
    key = settings.anthropic_api_key
    upstream = settings.anthropic_base_url or DEFAULT_ANTHROPIC_URL
    model = ModelProxy(upstream, key.get_secret_value()) if key else contextlib.nullcontext(None)
    with _bridge_dir() as bridges:
        service_dir = root / ".auto-code"
        fence_config = FenceConfig(
            bridge_dir=bridges,
            cache_dir=service_dir / "cache",
            key=load_key(service_dir / "canary-key"),
            policies=egress_policies(settings),
            intercept_tls=settings.egress_tls_intercept,
        )
        async with model as proxy, workspace.keeping_the_pool():
            fence = Fence(isolation, fence_config, model=proxy)
            async with _runner(settings, root, fence, token, workspace, proxy) as runner:
                yield runner


@asynccontextmanager
async def _runner(
    settings: Settings,
    root: Path,
    fence: Fence,
    token: str | None,
    workspace: Workspace,
    proxy: ModelProxy | None,
) -> AsyncIterator[Runner]:
    agent = ClaudeCode(
        AgentConfig(
            state_dir=root / ".auto-code" / "agent",
            model=settings.claude_model,
            max_turns=settings.max_turns,
            review_max_turns=settings.review_max_turns,
            phase_timeout=settings.agent_phase_timeout.total_seconds(),
            max_retries=settings.claude_code_max_retries,
            api_timeout_ms=settings.api_timeout_ms,
            model_access=proxy,
            passthrough=settings.agent_env_passthrough,
            extra_allowed_commands=frozenset(settings.agent_allowed_commands),
            allow_ci_config_writes=settings.allow_ci_config_writes,
            fence=fence,
        )
    )
    checks = Checks(
        ChecksConfig(
            lint_command=settings.lint_command,
            test_command=settings.test_command,
            setup_command=settings.setup_command,
            timeout=settings.check_timeout.total_seconds(),
            env=_check_env(settings, root / ".auto-code" / "check-home"),
            # Beside the agent's run dirs, so housekeeping removes a run's check home with them.
            homes=agent.config.state_dir / "runs",
        ),
        fence=fence,
    )
    slug = settings.github_repo or (
        github.repo_slug_from_url(settings.repo_url) if settings.repo_url else None
    )
    forge = None
    if slug and token:
        forge = github.GitHub(
            github.GitHubConfig(repo=slug, host=settings.gh_host, state_dir=root / ".auto-code" / "gh"), token
        )

    async def kill_leftovers() -> None:
        agent.kill_leftovers()

    def preflight() -> str | None:
        free_mb = shutil.disk_usage(root).free // (1024 * 1024)
        if free_mb < settings.min_free_disk_mb:
            return (
                f"only {free_mb} MB free under WORKSPACE_DIR; MIN_FREE_DISK_MB is {settings.min_free_disk_mb}"
            )
        return None

    async def cleanup_agent_state(cutoff: float, runs: set[str], sessions: set[str]) -> int:
        return await asyncio.to_thread(agent.remove_state_before, cutoff, runs, sessions)

    async with httpx.AsyncClient() as http:
        reporter: ReporterPort = LogReporter()
        if settings.jira_base_url and settings.jira_email and settings.jira_api_token:
            reporter = JiraReporter(
                http, settings.jira_base_url, settings.jira_email, settings.jira_api_token.get_secret_value()
            )
        runner = Runner(
            RunnerConfig(
                database_url=database_url(settings),
                executor_id=settings.replica_id,
                options=pipeline_options(settings, open_pr=forge is not None),
                max_concurrent=settings.max_concurrent_tickets,
                replica_concurrency=settings.replica_concurrency,
                run_timeout=settings.run_timeout.total_seconds(),
                polling_interval=settings.queue_poll_interval.total_seconds(),
                retention_days=settings.run_retention_days,
            ),
            Collaborators(
                workspace=workspace,
                agent=agent,
                checks=checks,
                pull_requests=forge,
                reporter=reporter,
                pr_body=render_pr_body,
                before_start=kill_leftovers,
                preflight=preflight,
                find_canaries=lambda run_id, text: fence.canaries(run_id).find(text),
                cleanup_worktrees=workspace.cleanup_expired,
                cleanup_agent_state=cleanup_agent_state,
            ),
        )
        async with runner:
            yield runner


def render_pr_body(result: RunResult, ticket: Ticket) -> str:
    """The PR description from what the run recorded."""
    return github.pr_body(
        ticket_key=ticket.key,
        ticket_url=ticket.url,
        ticket_title=ticket.summary,
        summary=result.summary,
        findings=[github.ReviewFinding(finding=text, resolution="fixed") for text in result.review_findings],
        review_rounds=len(result.review_findings),
        gates=[
            github.GateReport(
                name=report.gate.value,
                status=report.status,
                detail=report.detail,
                preexisting=report.preexisting.splitlines(),
            )
            for report in result.gates
        ],
        turns=result.turns,
        cost_usd=result.cost_usd,
        run_id=result.run_id,
        network=result.network_summary(),
    )


def create_app(settings: Settings, runner_factory: RunnerFactory | None = default_runner) -> FastAPI:
    """Build the app for these settings; the lifespan starts the runner that `runner_factory` makes."""
    register_secrets(settings.secret_values())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.webhook_secret is None:
            log.warning("WEBHOOK_SECRET is not set: webhook authentication is disabled (development only)")
        if settings.api_token is None:
            log.warning("API_TOKEN is not set: the runs API answers loopback callers only (development only)")
        if runner_factory is None:
            app.state.runner = None
            yield
            return
        async with runner_factory(settings) as runner:
            app.state.runner = runner
            app.state.runs = runner
            log.info("service ready", port=settings.claude_code_api_port, env=settings.node_env)
            try:
                yield
            finally:
                app.state.draining = True
                app.state.runner = None
                app.state.runs = None

    app = FastAPI(
        title="auto-code",
        summary="Turns a Jira ticket into a reviewed, linted, tested pull request.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.draining = False
    limiter = Limiter(key_func=lambda request: client_ip(request, settings.trust_proxy_headers))
    app.state.limiter = limiter
    _install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(runs.router)
    app.add_api_route(
        "/webhook/jira",
        limiter.limit(settings.rate_limit)(jira.webhook),
        methods=["POST"],
        status_code=status.HTTP_202_ACCEPTED,
        tags=["webhook"],
        summary="Receive a Jira ticket",
        openapi_extra=jira.OPENAPI_EXTRA,
        responses={
            200: {"description": "Ignored: the event does not start a run"},
            202: {"description": "Accepted, or a duplicate of a run already queued or running"},
            400: {"description": "Body is not JSON"},
            401: {"description": "Missing or wrong token or signature"},
            413: {"description": "Body too large"},
            422: {"description": "No usable ticket in the body"},
            429: {"description": "Rate limited"},
            503: {"description": "Starting or shutting down"},
        },
    )
    return app
