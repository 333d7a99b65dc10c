"""The whole stack for end-to-end tests: the real service as a subprocess (uvicorn, DBOS, CLI, git, gh)
against a throwaway origin, the scripted model server and a fake GitHub over HTTPS.

    with Stack(tmp_path, scripts) as stack:
        service = stack.service()            # `python -m app` with the stack's environment
        run_id = service.post_ticket(ticket_body("SHOP-1"))["run_id"]
        run = service.wait_for(run_id)       # until a final state
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import psycopg
from psycopg import sql

from app.demo.model_server import RecordedRequest, Script, ScriptedModelServer, prompt_texts
from app.demo.sample import DEMO_TICKET, create_origin
from tests.fakes.github_server import FakeGitHub
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[1]
WEBHOOK_SECRET = "pipeline-webhook-secret-0123456789"
API_TOKEN = "pipeline-api-token-0123456789"
GITHUB_TOKEN = "ghe_pipeline_token_0123456789"
GITHUB_REPO = "acme/widgets"
FINAL_STATES = ("pr_opened", "pushed", "no_changes", "dry_run", "failed", "cancelled", "quarantined")


def ticket_body(key: str = DEMO_TICKET.key, summary: str = DEMO_TICKET.summary) -> dict[str, Any]:
    """A Jira Automation ('Jira format') body for the sample ticket, or another key."""
    return {
        "issue": {
            "id": "10001",
            "key": key,
            "self": "https://example.atlassian.net/rest/api/2/issue/10001",
            "fields": {
                "summary": summary,
                "description": DEMO_TICKET.description,
                "project": {"key": key.split("-")[0]},
                "issuetype": {"name": "Story"},
                "labels": ["auto-code"],
            },
        }
    }


@dataclass
class Service:
    """One `python -m app` process serving the stack."""

    env: dict[str, str]
    log_path: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    _log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> Service:
        """Start the process and wait until /health answers."""
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app"], cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the service exited with {self.process.returncode}:\n{self.logs()[-3000:]}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"the service did not become healthy:\n{self.logs()[-3000:]}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def terminate(self, timeout: float = 30) -> float:
        """SIGTERM and wait for the exit; returns how long the exit took."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=timeout)
        return time.monotonic() - started

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def post_ticket(
        self, body: dict[str, Any], delivery: str | None = None, *, expect: int | None = 202
    ) -> dict[str, Any]:
        headers = {"X-Webhook-Token": WEBHOOK_SECRET}
        if delivery:
            headers["X-Atlassian-Webhook-Identifier"] = delivery
        response = httpx.post(f"{self.url}/webhook/jira", json=body, headers=headers, timeout=30)
        if expect is not None:
            assert response.status_code == expect, response.text
        answer: dict[str, Any] = response.json()
        answer["http_status"] = response.status_code
        return answer

    def cli(self, *args: str, token: str = API_TOKEN) -> subprocess.CompletedProcess[str]:
        """`auto-code runs ...` against this service, as an operator would type it."""
        env = {"PATH": os.environ["PATH"], "API_TOKEN": token, "PYTHONPATH": self.env["PYTHONPATH"]}
        return subprocess.run(
            [sys.executable, "-m", "app", "runs", args[0], "--url", self.url, *args[1:]],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {API_TOKEN}"}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=30, **kwargs)

    def get_run(self, run_id: str) -> dict[str, Any]:
        response = self.api("GET", f"/runs/{run_id}")
        assert response.status_code == 200, response.text
        run: dict[str, Any] = response.json()
        return run

    def wait_for(
        self, run_id: str, states: Sequence[str] = FINAL_STATES, timeout: float = 180
    ) -> dict[str, Any]:
        """Poll the runs API until the run is in one of `states`."""
        deadline = time.monotonic() + timeout
        run: dict[str, Any] = {}
        while time.monotonic() < deadline:
            run = self.get_run(run_id)
            if run["state"] in states:
                return run
            time.sleep(0.3)
        raise AssertionError(
            f"run {run_id} still {run.get('state')} after {timeout}s:\n{self.logs()[-4000:]}"
        )

    def wait_for_step(self, run_id: str, step: str, timeout: float = 60) -> dict[str, Any]:
        """Poll until `step` is running or done."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.get_run(run_id)
            if any(s["name"] == step for s in run["steps"]):
                return run
            time.sleep(0.1)
        raise AssertionError(f"step {step} of {run_id} never started:\n{self.logs()[-4000:]}")


@dataclass
class Stack:
    """Origin, scripted model, fake GitHub, and the environment that points the service at them."""

    tmp_path: Path
    scripts: list[Script]
    settings: dict[str, str] = field(default_factory=dict)
    sample_files: dict[str, str] | None = None
    origin: Path = field(init=False)
    model: ScriptedModelServer = field(init=False)
    github: FakeGitHub = field(init=False)
    services: list[Service] = field(default_factory=list)

    def __enter__(self) -> Stack:
        self.origin = create_origin(self.tmp_path / "remote", self.sample_files)
        self.model = ScriptedModelServer(self.scripts)
        self.model.start()
        self.github = FakeGitHub(repos=(GITHUB_REPO,), token=GITHUB_TOKEN).__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        for service in self.services:
            service.stop()
        self.github.__exit__(kind, error, tb)
        self.model.stop()

    @property
    def workspace(self) -> Path:
        return self.tmp_path / "workspace"

    def env(self, **overrides: str) -> dict[str, str]:
        """The service's whole environment: nothing of the developer's shell but PATH and the locale."""
        env = {name: os.environ[name] for name in ("PATH", "LANG", "LC_ALL", "HOME") if name in os.environ}
        env.update(
            {
                "NODE_ENV": "test",
                "HOST": "127.0.0.1",
                "WORKSPACE_DIR": str(self.workspace),
                "REPO_URL": str(self.origin),
                "BASE_BRANCH": "main",
                "GITHUB_REPO": GITHUB_REPO,
                "GH_HOST": self.github.host,
                "GH_ENTERPRISE_TOKEN": GITHUB_TOKEN,
                "SSL_CERT_FILE": str(self.github.ca_file),
                "ANTHROPIC_BASE_URL": self.model.base_url,
                "ANTHROPIC_API_KEY": "dummy-model-key",
                "CLAUDE_MODEL": "claude-sonnet-4-5",
                "WEBHOOK_SECRET": WEBHOOK_SECRET,
                "API_TOKEN": API_TOKEN,
                "RATE_LIMIT": "1000/minute",
                "LINT_COMMAND": "ruff check .",
                "TEST_COMMAND": "python -m pytest -q",
                "QUEUE_POLL_INTERVAL": "0.2s",
                "LOG_LEVEL": "INFO",
                "PYTHONPATH": str(ROOT),
            }
        )
        env.update(self.settings)
        env.update(overrides)
        return env

    def service(self, *, start: bool = True, port: int | None = None, **overrides: str) -> Service:
        """A service process on its own port (or `port`, to restart on the same one)."""
        port = port or free_port()
        env = self.env(CLAUDE_CODE_API_PORT=str(port), **overrides)
        name = overrides.get("REPLICA_ID", "local")
        service = Service(env=env, log_path=self.tmp_path / f"service-{name}.log", port=port)
        self.services.append(service)
        return service.start() if start else service

    def origin_branch(self, branch: str) -> str | None:
        """The commit `branch` points at in the origin, or None."""
        done = subprocess.run(
            ["git", "-C", str(self.origin), "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}"],
            capture_output=True,
            text=True,
            check=False,
        )
        return done.stdout.strip() or None

    def origin_branches(self) -> list[str]:
        """Every branch of the origin, sorted."""
        done = subprocess.run(
            ["git", "-C", str(self.origin), "for-each-ref", "--format=%(refname:short)", "refs/heads"],
            capture_output=True,
            text=True,
            check=True,
        )
        return sorted(done.stdout.split())

    def model_requests(self, trigger: str, turn: int | None = None) -> list[RecordedRequest]:
        """The message requests the model server answered from the script of `trigger` (at `turn`)."""
        return [
            request
            for request in self.model.message_requests
            if request.selection is not None
            and request.selection.script.trigger == trigger
            and (turn is None or request.selection.turn_index == turn)
        ]

    def origin_files(self, branch: str) -> list[str]:
        done = subprocess.run(
            ["git", "-C", str(self.origin), "ls-tree", "-r", "--name-only", branch],
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.split()


def step_names(run: dict[str, Any]) -> list[str]:
    """The names of a run record's steps, in order."""
    return [str(step["name"]) for step in run["steps"]]


def latest_prompt(request: RecordedRequest) -> str:
    """The prompt text of the last user message that has one (system reminders left out)."""
    for message in reversed(request.messages):
        if message.get("role") == "user" and (texts := prompt_texts(message)):
            return "\n".join(texts)
    return ""


def session_of(request: RecordedRequest) -> str | None:
    """The agent session a model request belongs to, as the CLI names it in its headers."""
    return request.headers.get("x-claude-code-session-id")


POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def postgres_problem(admin_url: str = POSTGRES_ADMIN_URL) -> str | None:
    """Why PostgreSQL cannot be used for a test, or None when it can."""
    try:
        psycopg.connect(admin_url, connect_timeout=5).close()
    except psycopg.Error as exc:
        return f"PostgreSQL is not reachable at {admin_url.rsplit('@', 1)[-1]}: {exc}"
    return None


@contextlib.contextmanager
def postgres_database(admin_url: str = POSTGRES_ADMIN_URL) -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped at the end; yields its URL."""
    name = f"auto_code_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield admin_url.rsplit("/", 1)[0] + f"/{name}"
        finally:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def log_lines(service: Service, since: int = 0) -> list[dict[str, Any]]:
    """The service's JSON log lines from character `since` on (other lines, e.g. a crash trace, are
    skipped). A restarted service appends to its predecessor's log: pass `len(old.logs())`."""
    lines = []
    for line in service.logs()[since:].splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict):
                lines.append(entry)
    return lines
