"""Workspace: the shared clone, a worktree per ticket, commit and push, against real repositories."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

from app.errors import CommandError, PushRejected, SandboxTampered, WorkspaceError
from app.models import Ticket
from app.workspace.places import TicketPlace
from app.workspace.publish import Changes
from app.workspace.worktrees import Workspace, WorkspaceConfig, Worktree
from tests.fakes.git_http_server import GitHttpServer, GitHttpState
from tests.gitrepos import Origin, git, git_env, install_hook, make_origin, write_files

T = TypeVar("T")

FILES = {
    "README.md": "# demo\n",
    ".gitignore": "*.log\nbuild/\n",
    "a.txt": "1\n2\n3\n",
    "b.txt": "gone\nsoon\n",
    "src/app.py": "print('hi')\n",
}
HOOKS = (
    "pre-commit",
    "prepare-commit-msg",
    "commit-msg",
    "post-commit",
    "post-checkout",
    "pre-push",
    "reference-transaction",
    "post-index-change",
)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def ticket(key: str = "PROJ-1", summary: str = "Add a greeting") -> Ticket:
    return Ticket(key=key, summary=summary, url=f"https://jira.example.com/browse/{key}", project="PROJ")


def workspace(tmp_path: Path, url: str | None, *, token: str | None = None, **options: Any) -> Workspace:
    config = WorkspaceConfig(
        workspace_dir=tmp_path / "ws", repo_url=url, git_timeout=60, author_email="bot@example.com", **options
    )
    return Workspace(config, token=token)


def current_branch(path: Path) -> str:
    return git(path, "symbolic-ref", "--short", "HEAD")


def registered_paths(clone: Path) -> list[Path]:
    listing = git(clone, "worktree", "list", "--porcelain")
    return [
        Path(line.removeprefix("worktree ")) for line in listing.splitlines() if line.startswith("worktree ")
    ]


def ticket_branches(ws: Workspace) -> list[str]:
    return git(ws.repo.clone, "for-each-ref", "--format=%(refname:short)", "refs/heads/ticket/").split()


@pytest.fixture
def origin(tmp_path: Path) -> Origin:
    return make_origin(tmp_path / "remote", FILES)


@pytest.fixture
def ws(tmp_path: Path, origin: Origin) -> Workspace:
    return workspace(tmp_path, origin.url)


# --- names, paths and keys ----------------------------------------------------------------------


def test_names_and_paths_come_from_one_place(tmp_path: Path) -> None:
    root = (tmp_path / "ws").resolve()
    place = TicketPlace.of("proj-1", tmp_path / "ws")
    assert (place.key, place.branch) == ("PROJ-1", "ticket/proj-1")
    assert place.clone == root / "repo"
    assert place.worktree == root / "worktrees" / "ticket" / "proj-1"
    other = TicketPlace.of("PROJ-1", tmp_path / "ws", repo_id="backend")
    assert other.clone == root / "repos" / "backend" / "repo"
    assert other.worktree == root / "repos" / "backend" / "worktrees" / "ticket" / "proj-1"
    for repo_id in ("../x", "Default", "-x", ""):
        with pytest.raises(WorkspaceError):
            TicketPlace.of("PROJ-1", tmp_path / "ws", repo_id=repo_id)


BAD_KEYS = [
    "../x",
    "--upload-pack=x",
    "-rf",
    "PROJ-1/../../etc",
    "PROJ-1;rm -rf /",
    "",
    "ticket/proj-1",
    "PROJ-01",
    "PROJ-1\n--force",
]


def test_key_injection_raises_before_git_runs(tmp_path: Path) -> None:
    calls = tmp_path / "git-calls"
    fake_git = tmp_path / "fake-git"
    fake_git.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\nexit 1\n')
    fake_git.chmod(0o755)
    config = WorkspaceConfig(workspace_dir=tmp_path / "ws", repo_url="https://example.com/o/r.git")
    ws = Workspace(config, git=str(fake_git))
    for key in BAD_KEYS:
        with pytest.raises(WorkspaceError, match="ticket key"):
            run(ws.prepare(key))
    forged = Worktree(
        key="PROJ-1",
        path=tmp_path / "elsewhere",
        branch="ticket/proj-1",
        base_branch="main",
        start_commit="0" * 40,
        remote_head=None,
    )
    for call in (ws.changes(forged), ws.commit(forged, ticket()), ws.push(forged), ws.remove(forged)):
        with pytest.raises(WorkspaceError, match="outside the workspace"):
            run(call)
    assert not calls.exists()
    # The recorder works: a valid key does reach (the fake) git.
    with pytest.raises(CommandError):
        run(ws.prepare("PROJ-1"))
    assert "clone" in calls.read_text()


def test_a_path_that_leaves_the_workspace_is_refused(tmp_path: Path, ws: Workspace) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    ws.root.mkdir(parents=True)
    (ws.root / "worktrees").symlink_to(outside, target_is_directory=True)
    with pytest.raises(WorkspaceError, match="outside the workspace"):
        run(ws.prepare("PROJ-1"))
    assert list(outside.iterdir()) == []


def test_a_token_in_the_url_is_refused(tmp_path: Path) -> None:
    with pytest.raises(WorkspaceError, match="password or token"):
        workspace(tmp_path, "https://x-access-token:secret-in-url@example.com/o/r.git")
    with pytest.raises(WorkspaceError, match="branch name"):
        workspace(tmp_path, "https://example.com/o/r.git", base_branch="--upload-pack=x")


# --- clone, base branch, worktrees --------------------------------------------------------------


def test_clones_when_missing_then_fetches(ws: Workspace, origin: Origin) -> None:
    run(ws.startup())
    assert not ws.repo.clone.exists()
    first = run(ws.prepare("PROJ-1"))
    assert (ws.repo.clone / ".git").is_dir()
    assert first.base_branch == "main" and first.start_commit == origin.sha("main")
    assert (first.path / "a.txt").read_text() == "1\n2\n3\n"
    upstream = origin.commit({"new.txt": "fresh\n"})
    second = run(ws.prepare("PROJ-2"))
    assert second.start_commit == upstream
    assert (second.path / "new.txt").read_text() == "fresh\n"
    assert git(ws.repo.clone, "rev-parse", "refs/remotes/origin/main") == upstream


def test_base_branch_is_origins_default_or_the_configured_one(tmp_path: Path) -> None:
    trunk = make_origin(tmp_path / "trunk-remote", branch="trunk")
    assert run(workspace(tmp_path / "a", trunk.url).prepare("PROJ-1")).base_branch == "trunk"
    develop = trunk.commit({"dev.txt": "dev\n"}, branch="develop", start="origin/trunk")
    wt = run(workspace(tmp_path / "b", trunk.url, base_branch="develop").prepare("PROJ-1"))
    assert (wt.base_branch, wt.start_commit) == ("develop", develop)
    with pytest.raises(WorkspaceError, match="not found on origin"):
        run(workspace(tmp_path / "c", trunk.url, base_branch="nope").prepare("PROJ-1"))


def test_prepare_again_reuses_the_worktree_and_its_files(ws: Workspace) -> None:
    wt = run(ws.prepare("PROJ-1"))
    (wt.path / "work.txt").write_text("in progress\n")
    again = run(ws.prepare("proj-1"))
    assert again.reused and not wt.reused
    assert (again.path, again.start_commit, again.branch) == (wt.path, wt.start_commit, wt.branch)
    assert (again.path / "work.txt").read_text() == "in progress\n"
    stored = json.loads(json.dumps(again.to_dict()))
    assert Worktree.from_dict(stored) == again


def test_a_lost_or_tampered_record_is_rebuilt_from_git(ws: Workspace) -> None:
    wt = run(ws.prepare("PROJ-1"))
    record = ws.place("PROJ-1").state_file
    record.write_text(json.dumps({"start_commit": "--output=/tmp/x", "base_branch": "main"}))
    again = run(ws.prepare("PROJ-1"))
    assert again.reused and again.start_commit == wt.start_commit
    record.unlink()
    (again.path / "work.txt").write_text("work\n")
    assert run(ws.commit(again, ticket())) is not None
    rebuilt = run(ws.prepare("PROJ-1"))
    assert rebuilt.reused and rebuilt.start_commit == wt.start_commit
    assert (rebuilt.path / "work.txt").exists()


def test_eight_tickets_prepared_concurrently(ws: Workspace) -> None:
    keys = [f"PROJ-{n}" for n in range(1, 9)]

    async def prepare_all() -> list[Worktree | BaseException]:
        return await asyncio.gather(*(ws.prepare(key) for key in keys), return_exceptions=True)

    results = run(prepare_all())
    failures = [result for result in results if isinstance(result, BaseException)]
    assert failures == []
    for key, wt in zip(keys, results, strict=True):
        assert isinstance(wt, Worktree)
        assert current_branch(wt.path) == f"ticket/{key.lower()}"
    assert len(registered_paths(ws.repo.clone)) == 1 + len(keys)


def test_two_processes_sharing_a_workspace_are_serialised(tmp_path: Path, origin: Origin) -> None:
    # Two Workspace objects with their own event loops: only the file lock keeps them apart.
    def prepare_in_own_loop(keys: list[str]) -> list[Worktree | BaseException]:
        ws = workspace(tmp_path, origin.url)

        async def prepare_all() -> list[Worktree | BaseException]:
            return await asyncio.gather(*(ws.prepare(key) for key in keys), return_exceptions=True)

        return asyncio.run(prepare_all())

    with ThreadPoolExecutor(2) as pool:
        batches = list(
            pool.map(prepare_in_own_loop, [["A-1", "A-2", "A-3", "A-4"], ["B-1", "B-2", "B-3", "B-4"]])
        )
    results = [result for batch in batches for result in batch]
    assert [result for result in results if isinstance(result, BaseException)] == []
    assert len(results) == 8


def test_repairs_a_deleted_dir_a_leftover_branch_a_wrong_branch_and_junk(
    ws: Workspace, origin: Origin
) -> None:
    older = origin.sha("main")
    newest = origin.commit({"more.txt": "more\n"})
    deleted = run(ws.prepare("PROJ-1"))
    shutil.rmtree(deleted.path)
    again = run(ws.prepare("PROJ-1"))
    assert not again.reused and (again.path / "more.txt").exists()
    assert registered_paths(ws.repo.clone).count(again.path) == 1

    git(ws.repo.clone, "branch", "ticket/proj-2", str(older))
    leftover = run(ws.prepare("PROJ-2"))
    assert git(leftover.path, "rev-parse", "HEAD") == newest

    wrong = run(ws.prepare("PROJ-3"))
    git(wrong.path, "checkout", "--quiet", "-b", "elsewhere")
    fixed = run(ws.prepare("PROJ-3"))
    assert not fixed.reused and current_branch(fixed.path) == "ticket/proj-3"

    junk = ws.place("PROJ-4").worktree
    junk.mkdir(parents=True)
    (junk / "junk.txt").write_text("left behind\n")
    clean = run(ws.prepare("PROJ-4"))
    assert not (clean.path / "junk.txt").exists() and current_branch(clean.path) == "ticket/proj-4"


def test_startup_prunes_stale_registrations(ws: Workspace) -> None:
    wt = run(ws.prepare("PROJ-1"))
    shutil.rmtree(wt.path)
    assert wt.path in registered_paths(ws.repo.clone)
    run(ws.startup())
    assert wt.path not in registered_paths(ws.repo.clone)


# --- changes and commit -------------------------------------------------------------------------


def test_changes_report_files_and_skip_ignored_and_oversized(tmp_path: Path, origin: Origin) -> None:
    ws = workspace(tmp_path, origin.url, max_file_bytes=1000)
    wt = run(ws.prepare("PROJ-1"))
    write_files(
        wt.path,
        {
            "a.txt": "1\nTWO\n3\n",
            "b.txt": None,
            "c.txt": "new\nfile\n",
            "bin.dat": b"\x00\x01\x02",
            "notes.log": "ignored\n",
            "build/out.o": "ignored too\n",
            "big.bin": "x" * 2000,
            "forced.log": "force-added\n",
        },
    )
    git(wt.path, "add", "--force", "forced.log")

    changes = run(ws.changes(wt))
    by_path = {change.path: change for change in changes.files}
    assert set(by_path) == {"a.txt", "b.txt", "c.txt", "bin.dat"}
    assert (by_path["a.txt"].status, by_path["a.txt"].insertions, by_path["a.txt"].deletions) == ("M", 1, 1)
    assert (by_path["b.txt"].status, by_path["b.txt"].deletions) == ("D", 2)
    assert (by_path["c.txt"].status, by_path["c.txt"].insertions) == ("A", 2)
    assert by_path["bin.dat"].binary
    assert (changes.insertions, changes.deletions) == (3, 3)
    skipped = {item.path: item.reason for item in changes.skipped}
    # The worktree's own index is the sandbox's to write: a force-add there does not make an ignored file
    # committable, and the service does not read that index to report it.
    assert set(skipped) == {"big.bin"}
    assert "larger than max_file_bytes" in skipped["big.bin"]
    assert "+TWO" in changes.diff and "c.txt" in changes.diff
    for name in ("notes.log", "build/out.o", "big.bin", "forced.log"):
        assert name not in changes.diff
    assert changes.summary().startswith("4 files changed, 3 insertions(+), 3 deletions(-)")
    assert json.loads(json.dumps(changes.to_dict()))["skipped"]

    sha = run(ws.commit(wt, ticket()))
    assert sha is not None
    committed = set(git(wt.path, "ls-tree", "-r", "--name-only", sha).splitlines())
    assert {"a.txt", "c.txt", "bin.dat"} <= committed
    assert committed.isdisjoint({"b.txt", "big.bin", "notes.log", "forced.log", "build/out.o"})
    assert (wt.path / "big.bin").stat().st_size == 2000  # left on disk, only kept out of git
    # Measured from the start commit, the committed work is still the run's change set.
    assert {change.path for change in run(ws.changes(wt)).files} == set(by_path)


def test_commit_message_identity_no_change_and_repeat(tmp_path: Path, ws: Workspace) -> None:
    wt = run(ws.prepare("PROJ-1"))
    assert run(ws.changes(wt)) == Changes()
    assert run(ws.commit(wt, ticket())) is None

    (wt.path / "greeting.txt").write_text("hello\n")
    sha = run(ws.commit(wt, ticket(summary="Add a\n greeting")))
    assert sha is not None
    shown = git(wt.path, "log", "-1", "--format=%an <%ae>%n%cn <%ce>%n%P%n%B", sha).splitlines()
    assert shown[:3] == ["auto-code <bot@example.com>", "auto-code <bot@example.com>", wt.start_commit]
    assert shown[3:] == ["PROJ-1: Add a greeting", "", "https://jira.example.com/browse/PROJ-1"]
    assert git(wt.path, "status", "--porcelain") == ""
    # Re-running the commit step (after a crash, or in a restarted process) neither fails nor doubles.
    assert run(ws.commit(wt, ticket())) == sha
    assert run(workspace(tmp_path, str(ws.repo.clone)).commit(wt, ticket())) == sha
    assert git(wt.path, "rev-parse", "HEAD") == sha
    with pytest.raises(WorkspaceError, match="does not own"):
        run(ws.commit(wt, ticket("PROJ-2")))


@pytest.mark.parametrize("where", ["git-dir", "core.hooksPath"])
def test_the_repositorys_hooks_never_run(tmp_path: Path, ws: Workspace, where: str) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    run(ws.prepare("PROJ-1"))  # makes the clone the hooks go into
    clone = ws.repo.clone
    if where == "git-dir":
        hooks = clone / ".git" / "hooks"
    else:
        hooks = tmp_path / "tracked-hooks"
        git(clone, "config", "core.hooksPath", str(hooks))
    for name in HOOKS:
        install_hook(hooks, name, f'touch "{markers}/{name}"')

    wt = run(ws.prepare("PROJ-2"))
    (wt.path / "change.txt").write_text("change\n")
    run(ws.changes(wt))
    assert run(ws.commit(wt, ticket("PROJ-2"))) is not None
    run(ws.push(wt))
    run(ws.remove(wt))
    run(ws.prepare("PROJ-3"))
    assert sorted(path.name for path in markers.iterdir()) == []

    # The hooks are live: plain git in the same clone runs them.
    plain = tmp_path / "plain"
    git(clone, "worktree", "add", "--quiet", "-b", "plain", str(plain), "origin/main")
    (plain / "a.txt").write_text("plain\n")
    git(plain, "commit", "--quiet", "-am", "plain commit")
    assert {"post-checkout", "pre-commit", "commit-msg"} <= {path.name for path in markers.iterdir()}


# --- what sandboxed code can write: the worktree's .git file and its admin dir ------------------


def evil_git_dir(tmp_path: Path, marker: Path) -> Path:
    """A git dir whose config names a textconv, an external diff, a clean filter and an fsmonitor."""
    evil = tmp_path / "evil"
    git(tmp_path, "init", "--quiet", str(evil))
    evil = evil / ".git"
    command = f"touch {shlex.quote(str(marker))}; cat"
    with (evil / "config").open("a") as config:
        config.write(
            f'[diff "evil"]\n\ttextconv = "{command} #"\n\tcommand = "{command} #"\n'
            f'[filter "evil"]\n\tclean = "{command}"\n\tsmudge = "{command}"\n\trequired = true\n'
            f'[core]\n\tfsmonitor = "{command} #"\n\tpager = "{command}"\n'
            f'[diff]\n\texternal = "{command} #"\n'
        )
    return evil


def admin_dir(wt: Worktree) -> Path:
    return Path((wt.path / ".git").read_text().removeprefix("gitdir: ").strip())


@pytest.mark.parametrize("tamper", ["commondir", "dot-git-file", "dot-git-dir", "config.worktree"])
def test_git_files_rewritten_in_the_worktree_run_nothing_on_the_host(
    tmp_path: Path, ws: Workspace, tamper: str
) -> None:
    marker = tmp_path / "ran-outside"
    wt = run(ws.prepare("PROJ-1"))
    evil = evil_git_dir(tmp_path, marker)
    write_files(wt.path, {".gitattributes": "* diff=evil filter=evil\n", "a.txt": "changed\n"})
    admin = admin_dir(wt)
    if tamper == "commondir":
        (admin / "commondir").write_text(f"{evil}\n")
    elif tamper == "dot-git-file":
        evil_admin = evil / "worktrees" / "x"
        shutil.copytree(admin, evil_admin)
        (evil_admin / "commondir").write_text("../..\n")
        (wt.path / ".git").write_text(f"gitdir: {evil_admin}\n")
    elif tamper == "dot-git-dir":
        (wt.path / ".git").unlink()
        shutil.copytree(evil, wt.path / ".git")
    else:
        shutil.copy(evil / "config", admin / "config.worktree")

    for step in (ws.changes(wt), ws.commit(wt, ticket()), ws.push(wt), ws.prepare("PROJ-1")):
        with pytest.raises(SandboxTampered, match="tampered"):
            run(step)
    assert not marker.exists()
    assert git(ws.repo.clone, "rev-parse", f"refs/heads/{wt.branch}") == wt.start_commit
    if tamper != "config.worktree":  # read only where the clone's config turns worktree configs on
        # The tampering is live: plain git in the worktree follows it and runs the command.
        git(wt.path, "status", check=False)
        assert marker.exists()


def test_drivers_named_in_the_worktree_but_not_configured_do_nothing(tmp_path: Path, ws: Workspace) -> None:
    """Attributes may name a driver; only the clone's config, which the sandbox cannot write, defines one."""
    wt = run(ws.prepare("PROJ-1"))
    admin = admin_dir(wt)
    write_files(wt.path, {".gitattributes": "* diff=evil filter=evil\n", "a.txt": "changed\n"})
    # The sandbox's own view of HEAD and the index: detached and emptied; the service reads the branch.
    (admin / "HEAD").write_text(f"{wt.start_commit}\n")
    (admin / "index").write_bytes(b"not an index")
    changes = run(ws.changes(wt))
    assert {change.path for change in changes.files} == {".gitattributes", "a.txt"}
    sha = run(ws.commit(wt, ticket()))
    assert sha is not None
    assert git(ws.repo.clone, "rev-parse", f"refs/heads/{wt.branch}") == sha
    assert git(ws.repo.clone, "show", f"{sha}:a.txt") == "changed"
    assert run(ws.push(wt)) == sha


# --- push ---------------------------------------------------------------------------------------


def test_rerun_starts_from_the_remote_branch_and_keeps_their_commit(ws: Workspace, origin: Origin) -> None:
    theirs = origin.commit({"someone.txt": "theirs\n"}, branch="ticket/proj-6", start="origin/main")
    wt = run(ws.prepare("PROJ-6"))
    assert (wt.start_commit, wt.remote_head) == (theirs, theirs)
    assert (wt.path / "someone.txt").read_text() == "theirs\n"
    (wt.path / "mine.txt").write_text("mine\n")
    sha = run(ws.commit(wt, ticket("PROJ-6")))
    assert sha is not None
    assert run(ws.push(wt)) == sha
    assert origin.sha("refs/heads/ticket/proj-6") == sha
    assert origin.git("rev-parse", f"{sha}^") == theirs


def test_lease_refuses_to_overwrite_a_commit_pushed_by_someone_else(ws: Workspace, origin: Origin) -> None:
    # The branch did not exist at prepare; someone creates it before we push.
    wt = run(ws.prepare("PROJ-7"))
    assert wt.remote_head is None
    theirs = origin.commit({"theirs.txt": "1\n"}, branch="ticket/proj-7", start="origin/main")
    (wt.path / "mine.txt").write_text("mine\n")
    assert run(ws.commit(wt, ticket("PROJ-7"))) is not None
    with pytest.raises(PushRejected, match="stale info"):
        run(ws.push(wt))
    assert origin.sha("refs/heads/ticket/proj-7") == theirs

    # The branch existed at prepare; someone adds a commit before we push.
    before = origin.commit({"first.txt": "1\n"}, branch="ticket/proj-8", start="origin/main")
    wt = run(ws.prepare("PROJ-8"))
    assert wt.remote_head == before
    theirs = origin.commit({"second.txt": "2\n"}, branch="ticket/proj-8")
    (wt.path / "mine.txt").write_text("mine\n")
    assert run(ws.commit(wt, ticket("PROJ-8"))) is not None
    with pytest.raises(PushRejected, match="stale info"):
        run(ws.push(wt))
    assert origin.sha("refs/heads/ticket/proj-8") == theirs


def test_push_is_safe_to_repeat_and_to_resume(tmp_path: Path, ws: Workspace, origin: Origin) -> None:
    wt = run(ws.prepare("PROJ-1"))
    (wt.path / "one.txt").write_text("1\n")
    first = run(ws.commit(wt, ticket()))
    assert run(ws.push(wt)) == first
    assert run(ws.push(wt)) == first
    restarted = workspace(tmp_path, origin.url)
    stored = Worktree.from_dict(json.loads(json.dumps(wt.to_dict())))
    assert run(restarted.push(stored)) == first
    (wt.path / "two.txt").write_text("2\n")
    second = run(restarted.commit(stored, ticket()))
    assert run(restarted.push(stored)) == second  # the lease is now what we pushed last
    assert origin.sha("refs/heads/ticket/proj-1") == second
    assert origin.sha("refs/heads/main") == wt.start_commit  # only the ticket's branch moved


def test_a_pre_receive_hook_rejection_raises_push_rejected(ws: Workspace, origin: Origin) -> None:
    install_hook(origin.path / "hooks", "pre-receive", 'echo "branch is protected" >&2; exit 1')
    wt = run(ws.prepare("PROJ-1"))
    (wt.path / "x.txt").write_text("x\n")
    run(ws.commit(wt, ticket()))
    with pytest.raises(PushRejected, match="pre-receive hook declined") as info:
        run(ws.push(wt))
    assert "branch is protected" in str(info.value)


# --- push over HTTP with a token ----------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Origin, GitHttpServer, str]]:
    origin = make_origin(tmp_path / "served", FILES)
    token = f"tok-{secrets.token_hex(16)}"
    with GitHttpServer(tmp_path / "served", password=token) as server:
        yield origin, server, token


def test_the_token_authenticates_and_a_wrong_one_fails(
    tmp_path: Path, served: tuple[Origin, GitHttpServer, str]
) -> None:
    origin, server, token = served
    url = server.url("origin.git")
    with pytest.raises(CommandError, match="Authentication failed"):
        run(workspace(tmp_path / "nobody", url, token="wrong-token-0123456789").prepare("PROJ-1"))
    ws = workspace(tmp_path, url, token=token)
    wt = run(ws.prepare("PROJ-1"))
    (wt.path / "x.txt").write_text("x\n")
    sha = run(ws.commit(wt, ticket()))
    with pytest.raises((PushRejected, CommandError)) as info:
        run(workspace(tmp_path, url, token="wrong-token-0123456789").push(wt))
    assert "Authentication failed" in str(info.value) and "wrong-token-0123456789" not in str(info.value)
    assert origin.sha("refs/heads/ticket/proj-1") is None
    assert run(ws.push(wt)) == sha
    assert origin.sha("refs/heads/ticket/proj-1") == sha
    assert any(not seen.authorised for seen in server.state.requests)
    assert any(seen.authorised and seen.path.endswith("git-receive-pack") for seen in server.state.requests)


class CmdlineSampler(threading.Thread):
    """Reads every /proc/*/cmdline until stopped; releases the held push once it has seen its processes."""

    def __init__(self, token: str, marker: str, state: GitHttpState) -> None:
        super().__init__(daemon=True)
        self.token = token.encode()
        self.marker = marker.encode()
        self.state = state
        self.seen: set[bytes] = set()
        self.leaks: list[bytes] = []
        self.done = threading.Event()

    @property
    def saw_push(self) -> bool:
        return any(b"push" in cmd for cmd in self.seen)

    @property
    def saw_helper(self) -> bool:
        return any(b"remote-http" in cmd for cmd in self.seen)

    def run(self) -> None:
        while not self.done.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as handle:
                        cmdline = handle.read()
                except OSError:
                    continue
                if self.token in cmdline:
                    self.leaks.append(cmdline)
                if self.marker in cmdline:
                    self.seen.add(cmdline)
            if self.state.receive_pack_arrived.is_set() and self.saw_push and self.saw_helper:
                self.state.release.set()
            time.sleep(0.001)


def test_the_token_is_in_no_argv_file_or_log_line(
    tmp_path: Path, served: tuple[Origin, GitHttpServer, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    origin, server, token = served
    ws = workspace(tmp_path, server.url("origin.git"), token=token)
    run(ws.startup())
    wt = run(ws.prepare("PROJ-1"))
    (wt.path / "x.txt").write_text("x\n")
    sha = run(ws.commit(wt, ticket()))

    server.state.hold_receive_pack = True
    sampler = CmdlineSampler(token, f"127.0.0.1:{server.port}", server.state)
    sampler.start()
    try:
        assert run(ws.push(wt)) == sha
    finally:
        sampler.done.set()
        sampler.join(timeout=10)
    assert server.state.released_in_time is True, "the push was not held until its processes were seen"
    assert sampler.saw_push and sampler.saw_helper
    assert sampler.leaks == []
    assert origin.sha("refs/heads/ticket/proj-1") == sha

    assert token not in (ws.repo.clone / ".git" / "config").read_text()
    assert token not in (wt.path / ".git").read_text()
    for directory, _, names in os.walk(ws.root):
        for name in names:
            path = Path(directory, name)
            if not path.is_symlink():
                assert token.encode() not in path.read_bytes(), path
    askpass = ws.root / ".auto-code" / "askpass"
    assert askpass.stat().st_mode & 0o777 == 0o700

    assert any(record.name == "app.workspace.worktrees" for record in caplog.records)
    for record in caplog.records:
        assert token not in record.getMessage() and token not in repr(vars(record))


def test_worktree_from_accepts_a_stored_record_and_refuses_a_forged_one(
    tmp_path: Path, ws: Workspace
) -> None:
    wt = run(ws.prepare("PROJ-1"))
    assert ws.worktree_from(json.loads(json.dumps(wt.to_dict()))) == wt
    for forged in ({"path": str(tmp_path)}, {"branch": "main"}, {"key": "../x"}, {"start_commit": "-x"}):
        with pytest.raises(WorkspaceError):
            ws.worktree_from({**wt.to_dict(), **forged})


def test_base_checkout_is_the_start_commit_and_goes_away(ws: Workspace) -> None:
    wt = run(ws.prepare("PROJ-1"))
    (wt.path / "a.txt").write_text("changed by the run\n")
    run(ws.commit(wt, ticket()))

    async def look() -> tuple[Path, str, str]:
        async with ws.base_checkout(wt) as base:
            assert base.is_relative_to(ws.root)
            return base, (base / "a.txt").read_text(), git(base, "rev-parse", "HEAD")

    base, text, head = run(look())
    assert (text, head) == ("1\n2\n3\n", wt.start_commit)
    assert not base.exists() and base not in registered_paths(ws.repo.clone)
    assert (wt.path / "a.txt").read_text() == "changed by the run\n"


# --- removal and cleanup ------------------------------------------------------------------------


def test_removal_hint_is_a_working_command(tmp_path: Path, ws: Workspace) -> None:
    wt = run(ws.prepare("PROJ-1"))
    (wt.path / "dirty.txt").write_text("kept under dry run\n")
    hint = ws.removal_hint(wt)
    assert hint.startswith("git -C ") and hint.endswith(" --force")
    subprocess.run(shlex.split(hint), env=git_env(tmp_path / "person"), check=True, capture_output=True)
    assert not wt.path.exists()
    assert wt.path not in registered_paths(ws.repo.clone)
    run(ws.remove(wt))  # nothing left to remove is fine
    assert not run(ws.prepare("PROJ-1")).reused


def test_remove_deletes_worktree_branch_and_is_repeatable(ws: Workspace) -> None:
    wt = run(ws.prepare("PROJ-1"))
    (wt.path / "dirty.txt").write_text("dirty\n")
    run(ws.remove(wt))
    assert not wt.path.exists()
    assert ticket_branches(ws) == []
    assert wt.path not in registered_paths(ws.repo.clone)
    run(ws.remove(wt))


def test_cleanup_expired_keeps_queued_and_fresh_worktrees(ws: Workspace) -> None:
    one, two, three = (run(ws.prepare(f"PROJ-{n}")) for n in (1, 2, 3))
    now = datetime.now(UTC)
    assert run(ws.cleanup_expired(keep=(), now=now + timedelta(days=1))) == []
    removed = run(ws.cleanup_expired(keep={"PROJ-2"}, now=now + timedelta(days=8)))
    assert sorted(removed) == sorted([one.path, three.path])
    assert two.path.exists() and not one.path.exists() and not three.path.exists()
    assert ticket_branches(ws) == ["ticket/proj-2"]


# --- REPO_DIR -----------------------------------------------------------------------------------


def test_repo_dir_mode_never_changes_the_users_checkout(tmp_path: Path) -> None:
    user = tmp_path / "user-repo"
    env = git_env(tmp_path / "user-home", name="user")
    git(tmp_path, "init", "--quiet", "--initial-branch=main", str(user), env=env)
    write_files(user, FILES)
    git(user, "add", "--all", env=env)
    git(user, "commit", "--quiet", "-m", "initial", env=env)
    git(user, "checkout", "--quiet", "-b", "feature", env=env)
    (user / "a.txt").write_text("feature\n")
    git(user, "commit", "--quiet", "-am", "feature work", env=env)
    (user / "a.txt").write_text("dirty, not committed\n")
    (user / "untracked.txt").write_text("mine\n")

    def snapshot() -> tuple[str, ...]:
        return (
            git(user, "symbolic-ref", "HEAD", env=env),
            git(user, "rev-parse", "HEAD", env=env),
            git(user, "status", "--porcelain", "--untracked-files=all", env=env),
            git(user, "stash", "list", env=env),
            (user / "a.txt").read_text(),
            (user / ".git" / "config").read_text(),
        )

    before = snapshot()
    config = WorkspaceConfig(workspace_dir=tmp_path / "ws", repo_dir=user, git_timeout=60)
    ws = Workspace(config)
    wt = run(ws.prepare("PROJ-1"))
    assert wt.base_branch == "feature"
    assert (wt.path / "a.txt").read_text() == "feature\n"
    (wt.path / "ticket.txt").write_text("ticket work\n")
    sha = run(ws.commit(wt, ticket()))
    assert run(ws.push(wt)) == sha
    run(ws.remove(wt))
    assert snapshot() == before
    assert git(user, "rev-parse", "refs/heads/ticket/proj-1", env=env) == sha


def test_ci_configuration_is_never_committed_unless_allowed(tmp_path: Path, origin: Origin) -> None:
    files = {".github/workflows/ci.yml": "on: push\n", ".gitlab-ci.yml": "x: 1\n", "src.txt": "code\n"}
    ws = workspace(tmp_path, origin.url)
    wt = run(ws.prepare("PROJ-1"))
    write_files(wt.path, files)
    sha = run(ws.commit(wt, ticket()))
    committed = git(wt.path, "show", "--name-only", "--format=", sha).split()
    assert committed == ["src.txt"]
    skipped = {item.path for item in run(ws.changes(wt)).skipped}
    assert skipped == {".github/workflows/ci.yml", ".gitlab-ci.yml"}

    allowing = workspace(tmp_path / "allowing", origin.url, allow_ci_config_writes=True)
    wt = run(allowing.prepare("PROJ-2"))
    write_files(wt.path, files)
    sha = run(allowing.commit(wt, ticket("PROJ-2")))
    assert sorted(git(wt.path, "show", "--name-only", "--format=", sha).split()) == sorted(files)
