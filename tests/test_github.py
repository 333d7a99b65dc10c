"""GitHub service: the real gh binary against a fake GitHub Enterprise over HTTPS on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.errors import GitHubError
from app.integrations.github import (
    GateReport,
    GitHub,
    GitHubConfig,
    PullRequest,
    ReviewFinding,
    gh_env,
    pr_body,
    repo_slug_from_url,
)
from tests.fakes.github_server import FakeGitHub

REPO = "acme/widgets"
FORK = "mallory/widgets"
TOKEN = "ghs_fakeTokenValue0123456789abcdef"
BRANCH = "ticket/PROJ-7"


@pytest.fixture
def fake() -> Iterator[FakeGitHub]:
    with FakeGitHub(repos=(REPO, FORK), token=TOKEN) as server:
        yield server


def client(fake: FakeGitHub, state_dir: Path | None = None, token: str = TOKEN) -> GitHub:
    config = GitHubConfig(
        repo=REPO, host=fake.host, extra_env=fake.extra_env, timeout=20, state_dir=state_dir
    )
    return GitHub(config, token)


def open_pr(github: GitHub, body: str = "the body", title: str = "PROJ-7: add a widget") -> PullRequest:
    return asyncio.run(github.open_pr(branch=BRANCH, base="main", title=title, body=body))


def creates(fake: FakeGitHub) -> int:
    return fake.operations().count("PullRequestCreate")


def test_creates_the_pull_request(fake: FakeGitHub) -> None:
    pr = open_pr(client(fake), body="## Summary\n\nLine one\n", title="-PROJ-7: leading dash")

    assert pr == PullRequest(url=fake.url(REPO, 1), number=1, created=True)
    [pull] = fake.pulls
    assert (pull.repo, pull.head_repo, pull.head, pull.base) == (REPO, REPO, BRANCH, "main")
    assert pull.title == "-PROJ-7: leading dash"
    assert pull.body == "## Summary\n\nLine one\n"
    assert fake.operations()[0] == "PullRequestList"
    assert creates(fake) == 1
    assert fake.unknown == []


def test_second_open_pr_returns_the_existing_one_and_creates_none(fake: FakeGitHub) -> None:
    github = client(fake)
    first = open_pr(github)
    second = open_pr(github)

    assert second == PullRequest(url=first.url, number=first.number, created=False)
    assert len(fake.pulls) == 1
    assert creates(fake) == 1


def test_a_fork_with_the_same_branch_name_does_not_count(fake: FakeGitHub) -> None:
    fake.seed_pull(repo=REPO, head=BRANCH, head_repo=FORK, title="from a fork")
    github = client(fake)

    assert asyncio.run(github.find_open_pr(BRANCH)) is None
    pr = open_pr(github)

    assert pr.created and pr.number == 2
    assert fake.pulls[1].head_repo == REPO
    assert asyncio.run(github.find_open_pr(BRANCH)) == PullRequest(pr.url, 2, created=False)


def test_a_closed_pull_request_does_not_count(fake: FakeGitHub) -> None:
    fake.seed_pull(repo=REPO, head=BRANCH, state="CLOSED")

    assert open_pr(client(fake)).number == 2


@pytest.mark.parametrize("operation", ["RepositoryInfo", "PullRequestCreate"])
def test_a_pull_request_opened_meanwhile_is_returned_not_duplicated(fake: FakeGitHub, operation: str) -> None:
    # RepositoryInfo: gh's own pre-check sees it; PullRequestCreate: GitHub refuses the mutation.
    fake.before(operation, lambda: fake.seed_pull(repo=REPO, head=BRANCH, title="the other replica"))

    pr = open_pr(client(fake))

    assert pr == PullRequest(url=fake.url(REPO, 1), number=1, created=False)
    assert len(fake.pulls) == 1


def test_the_token_travels_only_in_the_authorization_header(fake: FakeGitHub, tmp_path: Path) -> None:
    state = tmp_path / "gh-state"
    github = client(fake, state_dir=state)
    open_pr(github)

    assert fake.requests
    for request in fake.requests:
        assert request.authorization == f"token {TOKEN}"
        assert TOKEN not in request.path and TOKEN.encode() not in request.body
    for argv in (github.list_argv(BRANCH), github.create_argv(branch=BRANCH, base="main", title="t")):
        assert not any(TOKEN in arg for arg in argv)
    files = [path for path in state.rglob("*") if path.is_file()]
    assert files  # gh keeps its config and feature-detection cache there
    for path in files:
        assert TOKEN.encode() not in path.read_bytes(), path


def test_gh_gets_an_isolated_environment_with_only_its_token(tmp_path: Path) -> None:
    service_env = {
        "PATH": "/bin",
        "HOME": "/home/service",
        "GH_TOKEN": "service-gh-token",
        "ANTHROPIC_API_KEY": "sk-ant-secret",
        "WEBHOOK_SECRET": "hook-secret",
        "HTTPS_PROXY": "http://proxy:3128",
    }
    enterprise = gh_env(
        token=TOKEN,
        host="ghe.example:8443",
        home=tmp_path,
        extra={"SSL_CERT_FILE": "ca"},
        environ=service_env,
    )
    assert enterprise == {
        "PATH": "/bin",
        "HTTPS_PROXY": "http://proxy:3128",
        "SSL_CERT_FILE": "ca",
        "HOME": str(tmp_path),
        "GH_CONFIG_DIR": str(tmp_path / "config"),
        "GH_PROMPT_DISABLED": "1",
        "GH_NO_UPDATE_NOTIFIER": "1",
        "GH_SPINNER_DISABLED": "1",
        "NO_COLOR": "1",
        "GH_HOST": "ghe.example:8443",
        "GH_ENTERPRISE_TOKEN": TOKEN,
    }
    dotcom = gh_env(token=TOKEN, host=None, home=tmp_path, extra={}, environ=service_env)
    assert dotcom["GH_TOKEN"] == TOKEN
    assert "GH_HOST" not in dotcom and "GH_ENTERPRISE_TOKEN" not in dotcom


def test_repo_argument_carries_the_host_and_port(fake: FakeGitHub) -> None:
    argv = client(fake).create_argv(branch=BRANCH, base="main", title="t")
    assert f"--repo={fake.host}/{REPO}" in argv
    assert "--body-file=-" in argv
    dotcom = GitHub(GitHubConfig(repo=REPO, host="https://github.com/"), TOKEN)
    assert f"--repo={REPO}" in dotcom.list_argv(BRANCH)


def test_a_large_body_goes_through_stdin(fake: FakeGitHub) -> None:
    body = "".join(f"line {n}: {'x' * 80}\n" for n in range(500))  # ~45 kB
    github = client(fake)

    open_pr(github, body=body)

    assert fake.pulls[0].body == body
    assert not any(body[:200] in arg for arg in github.create_argv(branch=BRANCH, base="main", title="t"))


def test_a_graphql_error_becomes_a_readable_github_error(fake: FakeGitHub) -> None:
    fake.fail("PullRequestCreate", "Resource not accessible by integration")

    with pytest.raises(GitHubError, match=r"gh pr create failed: .*Resource not accessible by integration"):
        open_pr(client(fake))
    assert fake.pulls == []


def test_an_http_error_becomes_a_readable_github_error(fake: FakeGitHub) -> None:
    fake.fail("PullRequestList", "upstream exploded", status=502)

    with pytest.raises(GitHubError, match=r"gh pr list failed: .*502.*upstream exploded"):
        asyncio.run(client(fake).find_open_pr(BRANCH))


def test_a_bad_token_is_reported_without_the_token(fake: FakeGitHub) -> None:
    wrong = "ghs_wrongTokenValue9876543210fedcba"
    with pytest.raises(GitHubError, match="Bad credentials") as info:
        open_pr(client(fake, token=wrong))
    assert wrong not in str(info.value)


def test_an_unknown_repository_is_an_error(fake: FakeGitHub) -> None:
    config = GitHubConfig(repo="acme/missing", host=fake.host, extra_env=fake.extra_env)
    with pytest.raises(GitHubError, match="Could not resolve to a Repository"):
        asyncio.run(GitHub(config, TOKEN).find_open_pr(BRANCH))


def test_bad_configuration_fails_at_construction(tmp_path: Path) -> None:
    with pytest.raises(GitHubError, match="token is empty"):
        GitHub(GitHubConfig(repo=REPO), "")
    with pytest.raises(GitHubError, match="owner/name"):
        GitHub(GitHubConfig(repo="https://github.com/acme/widgets"), TOKEN)
    not_executable = tmp_path / "gh"
    not_executable.write_text("")
    with pytest.raises(GitHubError, match="not executable"):
        GitHub(GitHubConfig(repo=REPO, gh_path=str(not_executable)), TOKEN)


@pytest.mark.parametrize(
    ("url", "slug"),
    [
        ("https://github.com/acme/widgets", "acme/widgets"),
        ("https://github.com/acme/widgets.git", "acme/widgets"),
        ("https://github.com/acme/widgets/", "acme/widgets"),
        ("https://x-access-token:abc@github.com/acme/widgets.git", "acme/widgets"),
        ("https://ghe.example:8443/acme/my.repo.git", "acme/my.repo"),
        ("git@github.com:acme/widgets.git", "acme/widgets"),
        ("git@github.com:acme/widgets", "acme/widgets"),
        ("ssh://git@github.com/acme/widgets.git", "acme/widgets"),
        ("ssh://git@ghe.example:2222/acme/widgets.git", "acme/widgets"),
        ("  https://github.com/Acme-Co/wid_gets.git\n", "Acme-Co/wid_gets"),
        ("https://github.com/acme", None),
        ("https://github.com/acme/widgets/pull/1", None),
        ("https://gitlab.com/group/sub/project.git", None),
        ("file:///srv/git/widgets.git", None),
        ("/srv/git/widgets.git", None),
        ("../widgets", None),
        ("git@github.com:acme/..", None),
        ("", None),
    ],
)
def test_repo_slug_from_url(url: str, slug: str | None) -> None:
    assert repo_slug_from_url(url) == slug


def test_pr_body_carries_every_piece() -> None:
    body = pr_body(
        ticket_key="PROJ-7",
        ticket_url="https://jira.example/browse/PROJ-7",
        ticket_title="Add a widget",
        summary="Added `Widget` and its tests.",
        findings=[
            ReviewFinding("Missing None check in widget()", "fixed"),
            ReviewFinding("Rename helper", "declined: out of scope"),
        ],
        review_rounds=1,
        gates=[
            GateReport("lint", "passed"),
            GateReport(
                "tests",
                "failed",
                detail="FAILED tests/test_legacy.py::test_old - ```boom```",
                preexisting=["tests/test_legacy.py::test_old"],
            ),
        ],
        turns=23,
        cost_usd=1.234,
        run_id="run-42",
        network="Network: fenced; 0 requests through the egress proxy; 1 connection denied: x.test:443",
    )

    assert body.startswith("Resolves [PROJ-7](https://jira.example/browse/PROJ-7): Add a widget\n")
    assert "Added `Widget` and its tests." in body
    assert "- Missing None check in widget() — **fixed**" in body
    assert "- Rename helper — **declined: out of scope**" in body
    assert "1 fix round)" in body
    assert "✅ **lint**: passed" in body
    assert "❌ **tests**: failed" in body
    assert "already failing on the base branch (reported, not fixed): 1" in body
    assert "`tests/test_legacy.py::test_old`" in body
    assert "````\nFAILED tests/test_legacy.py::test_old - ```boom```\n````" in body
    assert "Agent turns: 23 · cost: $1.23 · run `run-42`" in body
    assert "1 connection denied: x.test:443" in body
    assert "Generated by auto-code" in body


def test_pr_body_without_findings_checks_or_url_and_with_huge_output() -> None:
    body = pr_body(
        ticket_key="PROJ-8",
        ticket_url=None,
        summary="",
        gates=[GateReport("tests", "failed", detail="x" * 200_000)],
    )
    assert body.startswith("Resolves PROJ-8\n")
    assert "_The agent gave no summary._" in body
    assert "The automated review found no issues." in body
    assert "[... earlier output cut ...]" in body
    assert len(body) < 10_000
    assert "No checks were run." in pr_body(ticket_key="PROJ-8", ticket_url=None, summary="s")
