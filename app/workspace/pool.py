"""The worktree pool: checkouts of the base branch made ahead of time, so a ticket does not wait for one.

`git worktree add` writes the whole tree (seconds to tens of seconds for a large repository); moving a
checkout that is already there to a new branch at the base changes only what differs. The pool keeps
`size` detached worktrees of the base under `<worktrees>/pool/`, each with a ready mark beside it
(`<name>.ready`, written once the checkout is complete and naming its commit). `take()` hands one over
(the caller moves it to the ticket's place and switches it to the ticket's branch); `fill()` tops the
pool up and moves ready entries to the current base, outside the clone lock except to register.

What it trusts: nothing a sandbox wrote ever reaches the pool. An entry is made by the service's own git
and handed out once; a ticket's worktree is removed at the run's end, never returned. An entry without
its mark (a crash during its checkout) is removed, not used.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
from pathlib import Path

from app.errors import CommandError
from app.logger import get_logger
from app.workspace.clone import SharedClone
from app.workspace.places import SHA, inside

log = get_logger(__name__)

POOL_DIR = "pool"
READY = ".ready"


class Pool:
    """Up to `size` ready worktrees of one repository's base branch."""

    def __init__(self, clone: SharedClone, size: int, *, min_free_mb: int = 0) -> None:
        self._clone = clone
        self.size = max(0, size)
        self.min_free_mb = min_free_mb
        self.dir = clone.repo.worktrees / POOL_DIR
        self._filling = asyncio.Lock()

    def ready(self) -> list[Path]:
        """The entries ready to hand out, oldest first."""
        if not self.dir.is_dir():
            return []
        marks = sorted(self.dir.glob(f"*{READY}"), key=lambda mark: mark.stat().st_mtime)
        return [mark.with_suffix("") for mark in marks if mark.with_suffix("").is_dir()]

    def take(self) -> Path | None:
        """Claim a ready entry (its mark goes first, so nothing else updates or hands it out), or None."""
        for entry in self.ready():
            with contextlib.suppress(FileNotFoundError):
                _mark(entry).unlink()
                return entry
        return None

    async def tidy(self) -> None:
        """At startup: remove entries a crash left half made, and marks whose entry is gone."""
        if not self.dir.is_dir():
            return
        ready = set(self.ready())
        for mark in self.dir.glob(f"*{READY}"):
            if mark.with_suffix("") not in ready:
                mark.unlink(missing_ok=True)
        stale = [entry for entry in self.dir.iterdir() if entry.is_dir() and entry not in ready]
        if not stale:
            return
        async with self._clone.locked():
            for entry in stale:
                await self._discard(entry)
        log.info("pool entries removed", reason="not ready at startup", paths=[str(path) for path in stale])

    async def fill(self) -> int:
        """Move ready entries to the current base and add entries up to `size`; how many were added.

        Runs after the clone has fetched. The checkouts run outside the clone lock (they are the slow
        part); registering a new entry holds it only as long as `git worktree add` needs to start.
        """
        if self.size == 0 or not self._clone.is_cloned():
            return 0
        async with self._filling:
            base = await self._clone.base_branch()
            commit = await self._clone.rev(f"refs/remotes/origin/{base}")
            if commit is None:
                return 0
            for entry in self.ready():
                if _marked_commit(entry) != commit:
                    await self._advance(entry, commit)
            added = 0
            while len(self.ready()) < self.size and self._room():
                if not await self._add(commit):
                    break
                added += 1
            return added

    async def _advance(self, entry: Path, commit: str) -> None:
        """Check a ready entry out at the new base (only the changed files are written)."""
        mark = _mark(entry)
        try:
            mark.unlink()
        except FileNotFoundError:  # taken meanwhile
            return
        done = await self._clone.git(["checkout", "--quiet", "--detach", commit], entry, check=False)
        if done.returncode == 0:
            mark.write_text(commit + "\n")
            log.info("pool entry moved to the base", path=str(entry), commit=commit[:12])
            return
        log.warning("pool entry dropped", path=str(entry), reason=done.output[-300:])
        async with self._clone.locked():
            await self._discard(entry)

    async def _add(self, commit: str) -> bool:
        entry = self.dir / f"p-{secrets.token_hex(4)}"
        inside(self._clone.root, entry)
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            await self._clone.git(["worktree", "add", "--quiet", "--detach", str(entry), commit])
        except CommandError as exc:
            log.warning("pool entry not added", path=str(entry), error=str(exc)[-300:])
            async with self._clone.locked():
                await self._discard(entry)
            return False
        _mark(entry).write_text(commit + "\n")
        log.info("pool entry added", path=str(entry), commit=commit[:12], ready=len(self.ready()))
        return True

    def _room(self) -> bool:
        free_mb = shutil.disk_usage(self._clone.root).free // (1024 * 1024)
        if free_mb < self.min_free_mb:
            log.warning("pool not filled", reason="low disk", free_mb=free_mb, floor_mb=self.min_free_mb)
            return False
        return True

    async def _discard(self, entry: Path) -> None:
        """Unregister and delete an entry (call under the clone lock)."""
        _mark(entry).unlink(missing_ok=True)
        await self._clone.git(["worktree", "remove", "--force", "--force", str(entry)], check=False)
        self._clone.remove_tree(entry)  # gone already: nothing to do
        await self._clone.git(["worktree", "prune"], check=False)


def _mark(entry: Path) -> Path:
    return entry.with_name(entry.name + READY)


def _marked_commit(entry: Path) -> str | None:
    with contextlib.suppress(OSError):
        text = _mark(entry).read_text().strip()
        return text if SHA.fullmatch(text) else None
    return None
