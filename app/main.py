"""create_app(settings): the FastAPI app, its error shapes and the lifespan that builds every service once."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from slowapi import Limiter
from slowapi.errors import RateLimitExceeded

from app.api.dependencies import TicketRunner
from app.api.security import client_ip
from app.config import Settings
from app.logger import get_logger, register_secrets
from app.routes import health, jira

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

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(RateLimitExceeded, rate_limited)
    app.add_exception_handler(Exception, unexpected)


def create_app(settings: Settings, runner_factory: RunnerFactory | None = None) -> FastAPI:
    """Build the app for these settings; the lifespan starts the runner that `runner_factory` makes."""
    register_secrets(settings.secret_values())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.webhook_secret is None:
            log.warning("WEBHOOK_SECRET is not set: webhook authentication is disabled (development only)")
        if runner_factory is None:
            app.state.runner = None
            yield
            return
        async with runner_factory(settings) as runner:
            app.state.runner = runner
            log.info("service ready", port=settings.claude_code_api_port, env=settings.node_env)
            try:
                yield
            finally:
                app.state.draining = True
                app.state.runner = None

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
