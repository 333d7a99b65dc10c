"""The worktree pool: checkouts of the base made ahead, handed to a fresh ticket, refilled, tidied."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from app.workspace.places import TicketState
from app.workspace.pool import READY
from app.workspace.worktrees import Workspace
from tests.gitrepos import Origin, git, make_origin
from tests.test_workspace import FILES, run, ticket, workspace


@pytest.fixture
def origin(tmp_path: Path) -> Origin:
    return make_origin(tmp_path / "remote", FILES)


@pytest.fixture
def ws(tmp_path: Path, origin: Origin) -> Workspace:
    return workspace(tmp_path, origin.url, pool_size=1)


async def _filled(ws: Workspace) -> int:
    async with ws._clone.locked():
        ws._clone.ensure_service_dirs()
        await ws._clone.sync()
    return await ws.pool.fill()


def _tree_on_disk(path: Path) -> list[str]:
    """Every file and directory under `path` but .git, as relative paths."""
    return sorted(str(item.relative_to(path)) for item in path.rglob("*") if ".git" not in item.parts)


def _tree_of(path: Path, commit: str) -> list[str]:
    files = git(path, "ls-tree", "-r", "-t", "--name-only", commit).splitlines()
    return sorted(files)


def test_a_fresh_ticket_gets_a_pool_entry_holding_exactly_the_base_tree(
    ws: Workspace, origin: Origin
) -> None:
    assert run(_filled(ws)) == 1
    (entry,) = ws.pool.ready()
    # A previous run of another ticket leaves ignored files, untracked dirs and changes behind.
    first = run(ws.prepare("PROJ-1"))
    assert Path(first.path).name == "proj-1"
    for name, text in {
        "build/out.o": "x",
        "debug.log": "x",
        "scratch/notes.txt": "x",
        "a.txt": "changed",
    }.items():
        (first.path / name).parent.mkdir(parents=True, exist_ok=True)
        (first.path / name).write_text(text)
    run(ws.remove(first))
    assert not entry.exists(), "the entry was moved to the ticket's place, not copied"

    run(_filled(ws))
    (second_entry,) = ws.pool.ready()
    wt = run(ws.prepare("PROJ-2"))
    state = TicketState.load(ws.place("PROJ-2").state_file)
    assert state is not None and state.admin == second_entry.name, "PROJ-2 was not given the pool's entry"
    assert ws.pool.ready() == []
    base = origin.sha("refs/heads/main")
    assert base is not None and wt.start_commit == base
    assert _tree_on_disk(wt.path) == _tree_of(wt.path, base)
    assert git(wt.path, "status", "--porcelain", "--ignored", "--untracked-files=all") == ""
    assert git(wt.path, "symbolic-ref", "--short", "HEAD") == "ticket/proj-2"
    # The handed-out worktree works like any other: commit and push.
    (wt.path / "c.txt").write_text("new\n")
    sha = run(ws.commit(wt, ticket("PROJ-2")))
    assert sha is not None and run(ws.push(wt)) == sha
    assert origin.sha("refs/heads/ticket/proj-2") == sha


def test_without_a_ready_entry_the_ticket_gets_its_own_checkout(ws: Workspace) -> None:
    wt = run(ws.prepare("PROJ-1"))  # nothing filled the pool yet
    assert (wt.path / "a.txt").read_text() == FILES["a.txt"]
    state = TicketState.load(ws.place("PROJ-1").state_file)
    assert state is not None and not state.admin.startswith("p-")


def test_the_pool_moves_to_a_base_that_a_fetch_moved(ws: Workspace, origin: Origin) -> None:
    run(_filled(ws))
    (entry,) = ws.pool.ready()
    moved = origin.commit({"new.txt": "arrived\n", "b.txt": None}, message="move the base")
    assert run(_filled(ws)) == 0, "the entry is moved, not replaced"
    assert ws.pool.ready() == [entry]
    assert (entry / "new.txt").read_text() == "arrived\n" and not (entry / "b.txt").exists()
    assert entry.with_name(entry.name + READY).read_text().strip() == moved
    wt = run(ws.prepare("PROJ-3"))
    assert wt.start_commit == moved and (wt.path / "new.txt").is_file()


def test_an_entry_a_crash_left_half_made_is_removed_and_the_pool_refills(
    tmp_path: Path, ws: Workspace, origin: Origin
) -> None:
    run(_filled(ws))
    (entry,) = ws.pool.ready()
    # A crash during a checkout: registered, partly written, no ready mark.
    half = ws.pool.dir / "p-deadbeef"
    git(ws.repo.clone, "worktree", "add", "--quiet", "--detach", str(half), "origin/main")
    (half / "a.txt").unlink()
    # A crash after a take: the mark is gone, the entry was never moved.
    entry.with_name(entry.name + READY).unlink()

    restarted = workspace(tmp_path, origin.url, pool_size=1)
    run(restarted.startup())
    assert restarted.pool.ready() == [] and not half.exists() and not entry.exists()
    listed = git(ws.repo.clone, "worktree", "list", "--porcelain")
    assert str(half) not in listed and str(entry) not in listed
    assert run(_filled(restarted)) == 1
    (fresh,) = restarted.pool.ready()
    assert _tree_on_disk(fresh) == _tree_of(fresh, "origin/main")


def test_the_pool_is_kept_full_in_the_background(tmp_path: Path, origin: Origin) -> None:
    ws = workspace(tmp_path, origin.url, pool_size=2, pool_refresh=0.2)

    async def scenario() -> tuple[int, int]:
        await ws.startup()
        async with ws.keeping_the_pool():
            await _until(lambda: len(ws.pool.ready()) == 2)
            await ws.prepare("PROJ-1")
            taken = len(ws.pool.ready())
            await _until(lambda: len(ws.pool.ready()) == 2)
            return taken, len(ws.pool.ready())

    assert run(scenario()) == (1, 2)


def test_no_pool_is_made_below_the_disk_floor(tmp_path: Path, origin: Origin) -> None:
    ws = workspace(tmp_path, origin.url, pool_size=1, pool_min_free_mb=10**9)
    assert run(_filled(ws)) == 0 and ws.pool.ready() == []


async def _until(condition: Callable[[], bool], timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.05)


def test_plain_git_sees_the_handed_out_worktree_as_registered(ws: Workspace) -> None:
    run(_filled(ws))
    wt = run(ws.prepare("PROJ-1"))
    listed = subprocess.run(
        ["git", "-C", str(ws.repo.clone), "worktree", "list", "--porcelain"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"worktree {wt.path}" in listed and "branch refs/heads/ticket/proj-1" in listed
