"""A fake GitHub Enterprise over HTTPS on 127.0.0.1 that answers what the real gh 2.103 sends."""

from __future__ import annotations

import contextlib
import json
import re
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

import trustme

_OPERATION = re.compile(r"\b(query|mutation)\s+(\w+)")
_TYPE_PROBE = re.compile(r'(\w+)\s*:\s*__type\(name:\s*"(\w+)"\)')
# What feature detection finds on the types gh asks about; gh 2.103 asks about Issue.
_TYPE_FIELDS = {
    "Issue": [
        "id",
        "number",
        "title",
        "body",
        "state",
        "stateReason",
        "url",
        "closedByPullRequestsReferences",
    ],
    "PullRequest": ["id", "number", "title", "body", "state", "url", "isDraft", "headRepository"],
}


@dataclass
class FakePull:
    """A pull request the fake holds: `repo` is the base repository, `head_repo` where the branch lives."""

    number: int
    url: str
    repo: str
    head_repo: str
    head: str
    base: str
    title: str
    body: str
    draft: bool = False
    state: str = "OPEN"

    @property
    def is_cross_repository(self) -> bool:
        """True when the head branch lives on a fork."""
        return self.head_repo != self.repo


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP request as the fake received it, with the GraphQL operation name when there is one."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    operation: str | None = None
    variables: dict[str, Any] = field(default_factory=dict)
    query: str = ""

    @property
    def authorization(self) -> str | None:
        """The Authorization header, whatever its case on the wire."""
        for name, value in self.headers.items():
            if name.lower() == "authorization":
                return value
        return None


@dataclass(frozen=True)
class Failure:
    """An injected failure for one GraphQL operation: an HTTP status, or a GraphQL error at 200."""

    operation: str
    message: str
    status: int = 200
    times: int | None = None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeGitHub


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        status, payload = self.server.fake._dispatch(self.command, self.path, dict(self.headers), body)
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class FakeGitHub:
    """GitHub Enterprise in miniature: `with FakeGitHub() as gh:` then point GH_HOST at `gh.host`.

    Repositories exist when named in `repos`; any other `owner/name` answers NOT_FOUND. With `token`,
    requests carrying another Authorization header get 401. Every request is kept in `requests`,
    every pull request in `pulls`; requests the fake does not understand land in `unknown` (and 404).
    It answers gh 2.103's `pr list --json` (PullRequestList) and `pr create` (RepositoryInfo,
    GET /api/v3/meta -> 404, an `Issue_fields` type probe, PullRequestForBranch, PullRequestCreate).
    """

    def __init__(self, *, repos: Iterable[str] = ("acme/widgets",), token: str | None = None) -> None:
        self.repos = {repo: index + 1 for index, repo in enumerate(repos)}
        self.token = token
        self.pulls: list[FakePull] = []
        self.requests: list[RecordedRequest] = []
        self.unknown: list[RecordedRequest] = []
        self.failures: list[Failure] = []
        self.hooks: dict[str, list[Callable[[], object]]] = {}
        # Re-entrant: a hook runs under the lock and may call seed_pull.
        self._lock = threading.RLock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self.host = ""
        self.ca_file = Path()

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> FakeGitHub:
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        self._dir = tempfile.TemporaryDirectory(prefix="fake-github-")
        self.ca_file = Path(self._dir.name) / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(context)
        server = _Server(("127.0.0.1", 0), _Handler)
        # Handshake in the handler thread, so one stalled client cannot block accept().
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        server.fake = self
        self._server = server
        self.host = f"127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-github", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._dir is not None:
            self._dir.cleanup()

    # -- helpers for tests -----------------------------------------------------------------------

    def add_repo(self, repo: str) -> None:
        """Make `owner/name` exist."""
        with self._lock:
            self.repos.setdefault(repo, len(self.repos) + 1)

    def seed_pull(
        self,
        *,
        repo: str,
        head: str,
        base: str = "main",
        head_repo: str | None = None,
        title: str = "seeded",
        body: str = "",
        state: str = "OPEN",
    ) -> FakePull:
        """Add a pull request into `repo`, from `head_repo` (a fork when it differs)."""
        with self._lock:
            return self._add_pull(repo, head_repo or repo, head, base, title, body, False, state)

    def fail(self, operation: str, message: str, *, status: int = 200, times: int | None = None) -> None:
        """Make `operation` fail: a GraphQL error at 200, or an HTTP error when `status` is not 200."""
        with self._lock:
            self.failures.append(Failure(operation, message, status, times))

    def before(self, operation: str, hook: Callable[[], object]) -> None:
        """Run `hook` once, just before the next `operation` is answered (to stage a race)."""
        with self._lock:
            self.hooks.setdefault(operation, []).append(hook)

    @property
    def extra_env(self) -> dict[str, str]:
        """What gh needs beside GH_HOST and the token to trust this server."""
        return {"SSL_CERT_FILE": str(self.ca_file)}

    def operations(self) -> list[str]:
        """The GraphQL operation names received, in order."""
        with self._lock:
            return [r.operation for r in self.requests if r.operation]

    def url(self, repo: str, number: int) -> str:
        """The web URL the fake gives pull request `number` of `repo`."""
        return f"https://{self.host}/{repo}/pull/{number}"

    # -- request handling ------------------------------------------------------------------------

    def _add_pull(
        self, repo: str, head_repo: str, head: str, base: str, title: str, body: str, draft: bool, state: str
    ) -> FakePull:
        number = len(self.pulls) + 1
        pull = FakePull(
            number, self.url(repo, number), repo, head_repo, head, base, title, body, draft, state
        )
        self.pulls.append(pull)
        return pull

    def _dispatch(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, Any]]:
        operation: str | None = None
        variables: dict[str, Any] = {}
        query = ""
        if method == "POST" and path == "/api/graphql":
            with contextlib.suppress(ValueError, AttributeError):
                document = json.loads(body)
                query = str(document.get("query", ""))
                match = _OPERATION.search(query)
                operation = match.group(2) if match else None
                variables = document.get("variables") or {}
        request = RecordedRequest(method, path, headers, body, operation, variables, query)
        with self._lock:
            self.requests.append(request)
            if self.token is not None and request.authorization != f"token {self.token}":
                return 401, {"message": "Bad credentials"}
            if method == "GET" and path == "/api/v3/meta":
                return 404, {"message": "Not Found"}
            handler = _handler_for(operation)
            if handler is None:
                self.unknown.append(request)
                return 404, {"message": f"fake GitHub does not know {method} {path} {operation}"}
            for hook in self.hooks.pop(operation or "", []):
                hook()
            failure = self._take_failure(operation or "")
            if failure is not None:
                if failure.status != 200:
                    return failure.status, {"message": failure.message}
                return 200, {"data": None, "errors": [{"type": "UNPROCESSABLE", "message": failure.message}]}
            return 200, handler(self, request)

    def _take_failure(self, operation: str) -> Failure | None:
        for index, failure in enumerate(self.failures):
            if failure.operation == operation:
                if failure.times is not None:
                    left = failure.times - 1
                    if left <= 0:
                        del self.failures[index]
                    else:
                        self.failures[index] = Failure(operation, failure.message, failure.status, left)
                return failure
        return None

    def _repo_node(self, repo: str) -> dict[str, Any]:
        owner, name = repo.split("/", 1)
        return {
            "id": f"R_{self.repos[repo]}",
            "databaseId": self.repos[repo],
            "name": name,
            "nameWithOwner": repo,
            "owner": {"id": f"U_{owner}", "login": owner},
            "sshUrl": f"git@{self.host}:{repo}.git",
            "url": f"https://{self.host}/{repo}",
            "hasIssuesEnabled": True,
            "description": "",
            "hasWikiEnabled": False,
            "viewerPermission": "ADMIN",
            "defaultBranchRef": {"name": "main"},
            "parent": None,
            "mergeCommitAllowed": True,
            "rebaseMergeAllowed": True,
            "squashMergeAllowed": True,
        }

    def _pull_node(self, pull: FakePull) -> dict[str, Any]:
        owner, name = pull.head_repo.split("/", 1)
        return {
            "id": f"PR_{pull.number}",
            "url": pull.url,
            "number": pull.number,
            "title": pull.title,
            "body": pull.body,
            "state": pull.state,
            "isDraft": pull.draft,
            "baseRefName": pull.base,
            "headRefName": pull.head,
            "isCrossRepository": pull.is_cross_repository,
            "headRepositoryOwner": {"id": f"U_{owner}", "login": owner},
            "headRepository": {
                "id": f"R_{self.repos.get(pull.head_repo, 0)}",
                "name": name,
                "nameWithOwner": pull.head_repo,
            },
        }

    def _not_found(self, repo: str) -> dict[str, Any]:
        return {
            "data": {"repository": None},
            "errors": [
                {
                    "type": "NOT_FOUND",
                    "path": ["repository"],
                    "message": f"Could not resolve to a Repository with the name '{repo}'.",
                }
            ],
        }

    def _repository_info(self, request: RecordedRequest) -> dict[str, Any]:
        variables = request.variables
        repo = f"{variables.get('owner')}/{variables.get('name')}"
        if repo not in self.repos:
            return self._not_found(repo)
        return {"data": {"repository": self._repo_node(repo)}}

    def _pull_request_list(self, request: RecordedRequest) -> dict[str, Any]:
        variables = request.variables
        repo = f"{variables.get('owner')}/{variables.get('repo')}"
        if repo not in self.repos:
            return self._not_found(repo)
        states = variables.get("state") or ["OPEN"]
        head, base = variables.get("headBranch"), variables.get("baseBranch")
        matches = [
            p
            for p in reversed(self.pulls)
            if p.repo == repo
            and p.state in states
            and (head is None or p.head == head)
            and (base is None or p.base == base)
        ]
        nodes = [self._pull_node(p) for p in matches[: int(variables.get("limit") or 30)]]
        return {
            "data": {
                "repository": {
                    "pullRequests": {
                        "totalCount": len(matches),
                        "nodes": nodes,
                        "pageInfo": {"hasNextPage": False, "endCursor": None},
                    }
                }
            }
        }

    def _type_probe(self, request: RecordedRequest) -> dict[str, Any]:
        """Answer `Alias: __type(name: "T"){fields{name}}` feature-detection probes."""
        return {
            "data": {
                alias: {"fields": [{"name": name} for name in _TYPE_FIELDS.get(type_name, [])]}
                for alias, type_name in _TYPE_PROBE.findall(request.query)
            }
        }

    def _pull_request_for_branch(self, request: RecordedRequest) -> dict[str, Any]:
        variables = request.variables
        repo = f"{variables.get('owner')}/{variables.get('repo')}"
        if repo not in self.repos:
            return self._not_found(repo)
        states = variables.get("states") or ["OPEN"]
        matches = [
            p
            for p in reversed(self.pulls)
            if p.repo == repo and p.state in states and p.head == variables.get("headRefName")
        ]
        return {
            "data": {
                "repository": {
                    "pullRequests": {"nodes": [self._pull_node(p) for p in matches[:30]]},
                    "defaultBranchRef": {"name": "main"},
                }
            }
        }

    def _pull_request_create(self, request: RecordedRequest) -> dict[str, Any]:
        fields = request.variables.get("input") or {}
        repo = next((r for r, n in self.repos.items() if f"R_{n}" == fields.get("repositoryId")), None)
        if repo is None:
            return {"data": None, "errors": [{"type": "NOT_FOUND", "message": "Could not resolve to a node"}]}
        head = str(fields.get("headRefName", ""))
        head_owner, _, branch = head.rpartition(":")
        head_repo = f"{head_owner}/{repo.split('/', 1)[1]}" if head_owner else repo
        for pull in self.pulls:
            if (
                pull.repo == repo
                and pull.head_repo == head_repo
                and pull.head == branch
                and pull.state == "OPEN"
            ):
                owner = head_repo.split("/", 1)[0]
                return {
                    "data": {"createPullRequest": None},
                    "errors": [
                        {
                            "type": "UNPROCESSABLE",
                            "path": ["createPullRequest"],
                            "message": f"A pull request already exists for {owner}:{branch}.",
                        }
                    ],
                }
        pull = self._add_pull(
            repo,
            head_repo,
            branch,
            str(fields.get("baseRefName", "")),
            str(fields.get("title", "")),
            str(fields.get("body", "")),
            bool(fields.get("draft", False)),
            "OPEN",
        )
        return {"data": {"createPullRequest": {"pullRequest": {"id": f"PR_{pull.number}", "url": pull.url}}}}


_OPERATIONS = {
    "RepositoryInfo": FakeGitHub._repository_info,
    "PullRequestList": FakeGitHub._pull_request_list,
    "PullRequestForBranch": FakeGitHub._pull_request_for_branch,
    "PullRequestCreate": FakeGitHub._pull_request_create,
}


def _handler_for(operation: str | None) -> Callable[[FakeGitHub, RecordedRequest], dict[str, Any]] | None:
    if operation is None:
        return None
    if operation.endswith("_fields"):
        return FakeGitHub._type_probe
    return _OPERATIONS.get(operation)
