"""The worktrees of one repository, one per ticket on `ticket/<key>`: prepare (reusing a good one), base
checkouts, remove, and cleanup past the TTL; `Workspace` is the pipeline's one door to the git side, and
hands changes, commit and push to publish. It trusts no Worktree record it is given (each is re-checked
against the names it would build) and no worktree's git files (see worktree_git).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shlex
import time
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.errors import CommandError, WorkspaceError
from app.logger import get_logger
from app.models import Ticket
from app.workspace import publish
from app.workspace.clone import TEMP_MAX_AGE_SECONDS, SharedClone
from app.workspace.places import (
    BASE_DIR,
    BRANCH_PREFIX,
    DEFAULT_REPO_ID,
    SHA,
    TicketPlace,
    TicketState,
    WorkspaceConfig,
    check_key,
    inside,
)
from app.workspace.pool import Pool
from app.workspace.publish import UNSET, Changes, Unset
from app.workspace.worktree_git import branch_head, checked_admin_dir, new_admin_dir, refuse_a_replaced_marker

__all__ = ["Workspace", "WorkspaceConfig", "Worktree"]

log = get_logger(__name__)


@dataclass(frozen=True)
class Worktree:
    """A prepared ticket worktree; plain data so a durable runner can store it as a step result."""

    key: str
    path: Path
    branch: str
    base_branch: str
    start_commit: str
    remote_head: str | None
    reused: bool = False
    repo_id: str = DEFAULT_REPO_ID

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "key": self.key,
            "path": str(self.path),
            "branch": self.branch,
            "base_branch": self.base_branch,
            "start_commit": self.start_commit,
            "remote_head": self.remote_head,
            "reused": self.reused,
            "repo_id": self.repo_id,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Worktree:
        """Rebuild a Worktree from `to_dict` output (the workspace re-checks it before any use)."""
        return cls(
            key=str(data["key"]),
            path=Path(data["path"]),
            branch=str(data["branch"]),
            base_branch=str(data["base_branch"]),
            start_commit=str(data["start_commit"]),
            remote_head=None if data.get("remote_head") is None else str(data["remote_head"]),
            reused=bool(data.get("reused", False)),
            repo_id=str(data.get("repo_id", DEFAULT_REPO_ID)),
        )


@dataclass
class _Registered:
    """One entry of `git worktree list --porcelain`."""

    path: Path
    head: str | None = None
    branch: str | None = None
    flags: set[str] = field(default_factory=set)


class Workspace:
    """The git side of the pipeline for one repository: one shared clone and a worktree per ticket."""

    def __init__(
        self,
        config: WorkspaceConfig,
        token: str | None = None,
        *,
        repo_id: str = DEFAULT_REPO_ID,
        git: str = "git",
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._config = config
        self._clone = SharedClone(config, token, repo_id=repo_id, git=git, environ=environ)
        self.repo = self._clone.repo
        self.root = self._clone.root
        self.pool = Pool(self._clone, config.pool_size, min_free_mb=config.pool_min_free_mb)
        self._pool_wake = asyncio.Event()

    # --- names and paths ------------------------------------------------------------------------

    def place(self, key: str) -> TicketPlace:
        """The validated names and paths of a ticket in this workspace."""
        return TicketPlace.within(key, self.repo)

    def worktree_from(self, data: Mapping[str, Any]) -> Worktree:
        """Rebuild a stored Worktree (a step result) and check that it belongs to this workspace."""
        wt = Worktree.from_dict(data)
        self._place_of_record(wt)
        return wt

    def removal_hint(self, wt: Worktree) -> str:
        """The command a person can paste to remove a worktree kept under DRY_RUN."""
        place = self._place_of_record(wt)
        return (
            f"git -C {shlex.quote(str(place.clone))} worktree remove "
            f"{shlex.quote(str(place.worktree))} --force"
        )

    def _place_of_record(self, wt: Worktree) -> TicketPlace:
        """Re-check a Worktree record (it may come from storage) against the names we would build."""
        if wt.repo_id != self.repo.repo_id:
            raise WorkspaceError(f"worktree of repository {wt.repo_id!r} given to {self.repo.repo_id!r}")
        place = self.place(wt.key)
        if wt.branch != place.branch or inside(self.root, Path(wt.path)) != place.worktree:
            raise WorkspaceError(f"worktree record for {place.key} does not match its place")
        for sha in (wt.start_commit, wt.remote_head):
            if sha is not None and not SHA.fullmatch(sha):
                raise WorkspaceError(f"worktree record for {place.key} holds a bad commit id")
        return place

    def _place_of(self, wt: Worktree) -> TicketPlace:
        """Like _place_of_record, and the worktree must exist."""
        place = self._place_of_record(wt)
        refuse_a_replaced_marker(place)
        if not (place.worktree / ".git").is_file():
            raise WorkspaceError(f"the worktree of {place.key} is missing: {place.worktree}")
        return place

    # --- lifecycle ------------------------------------------------------------------------------

    async def startup(self) -> None:
        """Create the service's directories, drop old temporary files, prune stale registrations."""
        self._clone.ensure_service_dirs()
        self._clone.drop_old_temporaries()
        if self._clone.is_cloned():
            await self._drop_stale_base_checkouts()
            await self.pool.tidy()
            async with self._clone.locked():
                await self._clone.git(["worktree", "prune"])
        log.info("workspace ready", workspace=str(self.root), repo=self.repo.repo_id)

    @contextlib.asynccontextmanager
    async def keeping_the_pool(self) -> AsyncIterator[None]:
        """For the block, keep the pool full and at the current base: fetch on a timer and after a take."""
        if self.pool.size == 0:
            yield
            return
        task = asyncio.create_task(self._pool_loop())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _pool_loop(self) -> None:
        while True:
            self._pool_wake.clear()
            started = time.monotonic()
            try:
                async with self._clone.locked():
                    self._clone.ensure_service_dirs()
                    await self._clone.sync()
                added = await self.pool.fill()
                if added:
                    log.info("pool filled", added=added, seconds=round(time.monotonic() - started, 2))
            except (WorkspaceError, CommandError) as exc:
                log.warning("pool not refreshed", error=str(exc)[-500:])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._pool_wake.wait(), self._config.pool_refresh)

    async def prepare(self, key: str) -> Worktree:
        """Fetch (or clone) and return the ticket's worktree on `ticket/<key>`, reusing a good one."""
        place = self.place(key)
        clone = self._clone
        clone.ensure_service_dirs()
        async with clone.locked():
            await clone.sync()
            base = await clone.base_branch()
            base_commit = await clone.rev(f"refs/remotes/origin/{base}")
            if base_commit is None:
                raise WorkspaceError(f"base branch {base!r} not found on origin")
            remote_head = await clone.rev(f"refs/remotes/origin/{place.branch}")
            await clone.git(["worktree", "prune"])
            registered = await self._registered()
            mine = registered.get(place.worktree)
            if mine is not None:
                refuse_a_replaced_marker(place)
            if (
                mine is not None
                and mine.branch == f"refs/heads/{place.branch}"
                and (place.worktree / ".git").is_file()
            ):
                state = await self._reused_state(place, base, base_commit, remote_head)
                reused = True
            else:
                await self._clear_way(place, registered)
                start = remote_head or base_commit
                place.worktree.parent.mkdir(parents=True, exist_ok=True)
                if not await self._from_pool(place, start):
                    await clone.git(
                        ["worktree", "add", "--no-track", "-B", place.branch, str(place.worktree), start]
                    )
                state = TicketState(
                    start_commit=start,
                    base_branch=base,
                    remote_head=remote_head,
                    admin=new_admin_dir(place).name,
                )
                reused = False
            state.save(place.state_file)
        log.info(
            "worktree prepared",
            ticket=place.key,
            path=str(place.worktree),
            branch=place.branch,
            base=state.base_branch,
            start=state.start_commit,
            remote_head=state.remote_head,
            reused=reused,
        )
        return Worktree(
            key=place.key,
            path=place.worktree,
            branch=place.branch,
            base_branch=state.base_branch,
            start_commit=state.start_commit,
            remote_head=state.remote_head,
            reused=reused,
            repo_id=self.repo.repo_id,
        )

    async def changes(self, wt: Worktree) -> Changes:
        """What committing now would record since the start commit: files, counts, diff, skipped."""
        return await publish.changes(self._clone, self._place_of(wt), wt.start_commit)

    async def commit(self, wt: Worktree, ticket: Ticket) -> str | None:
        """Commit every change but ignored and oversized files; the sha, or None when nothing changed."""
        return await publish.commit(self._clone, self._place_of(wt), wt.start_commit, ticket)

    async def push(self, wt: Worktree, expected_remote: str | Unset | None = UNSET) -> str:
        """Push `ticket/<key>` only, leased on the remote sha we know; return the pushed sha.

        The lease is `expected_remote` when given (None: the branch must not exist yet), else the sha
        this service last pushed, else the remote sha recorded when the worktree was prepared.
        """
        place = self._place_of(wt)
        prepared = TicketState(
            start_commit=wt.start_commit, base_branch=wt.base_branch, remote_head=wt.remote_head
        )
        return await publish.push(self._clone, place, prepared, expected_remote)

    @contextlib.asynccontextmanager
    async def base_checkout(self, wt: Worktree) -> AsyncIterator[Path]:
        """A throwaway detached checkout of the run's start commit, removed on exit (for baselines)."""
        place = self._place_of_record(wt)
        self._clone.ensure_service_dirs()
        path = inside(
            self.root, self.repo.worktrees / BASE_DIR / f"{place.key.lower()}-{secrets.token_hex(4)}"
        )
        async with self._clone.locked():
            path.parent.mkdir(parents=True, exist_ok=True)
            await self._clone.git(["worktree", "add", "--detach", str(path), wt.start_commit])
        try:
            yield path
        finally:
            async with self._clone.locked():
                await self._unregister(path)
                if path.exists():
                    self._clone.remove_tree(path)
                await self._clone.git(["worktree", "prune"])

    async def remove(self, wt: Worktree) -> None:
        """Remove the ticket's worktree, its local branch and its record (safe to repeat)."""
        await self._remove_place(self._place_of_record(wt))

    async def cleanup_expired(self, keep: Collection[str], now: datetime | None = None) -> list[Path]:
        """Remove worktrees idle past the TTL, except those of tickets in `keep`; return their paths."""
        cutoff = (now or datetime.now(UTC)).timestamp() - self._config.worktree_ttl.total_seconds()
        kept = set()
        for key in keep:
            with contextlib.suppress(WorkspaceError):
                kept.add(check_key(key))
        removed: list[Path] = []
        for place in self._known_places():
            last_used = _last_used(place)
            if place.key in kept or last_used is None or last_used >= cutoff:
                continue
            existed = place.worktree.exists()
            await self._remove_place(place)
            if existed:
                removed.append(place.worktree)
        if self._clone.is_cloned():
            await self._drop_stale_base_checkouts()
            async with self._clone.locked():
                # The one place gc may run: under the clone lock, in the foreground.
                gc = ["-c", "gc.auto=6700", "-c", "gc.autoDetach=false", "gc", "--auto", "--quiet"]
                await self._clone.git(gc, check=False)
        log.info("expired worktrees removed", removed=[str(path) for path in removed], kept=sorted(kept))
        return removed

    # --- the clone's worktrees ------------------------------------------------------------------

    async def _registered(self) -> dict[Path, _Registered]:
        """The clone's worktrees by resolved path."""
        listed = await self._clone.git(["worktree", "list", "--porcelain"])
        entries: dict[Path, _Registered] = {}
        current: _Registered | None = None
        for line in listed.stdout.splitlines():
            if line.startswith("worktree "):
                current = _Registered(_resolved(line.removeprefix("worktree ")))
                entries[current.path] = current
            elif current is None or not line:
                continue
            elif line.startswith("HEAD "):
                current.head = line.removeprefix("HEAD ")
            elif line.startswith("branch "):
                current.branch = line.removeprefix("branch ")
            else:
                current.flags.add(line.split(" ", 1)[0])
        return entries

    async def _reused_state(
        self, place: TicketPlace, base: str, base_commit: str, remote_head: str | None
    ) -> TicketState:
        """The record of a worktree being reused; rebuilt from git when it was lost."""
        clone = self._clone
        state = TicketState.load(place.state_file)
        admin = checked_admin_dir(place, state.admin if state else None).name
        head = await branch_head(clone, place)
        if (
            state is not None
            and await clone.rev(state.start_commit) is not None
            and await clone.is_ancestor(state.start_commit, head)
        ):
            state.admin = admin
            return state
        # Only a remote sha our branch contains may be the lease: pushing over it loses nothing.
        contained = remote_head if remote_head and await clone.is_ancestor(remote_head, head) else None
        start = contained
        if start is None:
            merge_base = await clone.git(["merge-base", head, base_commit], check=False)
            start = merge_base.stdout.strip() if merge_base.returncode == 0 else head
        log.warning("worktree record rebuilt", ticket=place.key, start=start)
        return TicketState(start_commit=start, base_branch=base, remote_head=contained, admin=admin)

    async def _from_pool(self, place: TicketPlace, start: str) -> bool:
        """Move a ready pool entry to the ticket's place and switch it to the branch (under the lock)."""
        entry = self.pool.take()
        if entry is None:
            return False
        self._pool_wake.set()
        clone = self._clone
        moved = await clone.git(["worktree", "move", str(entry), str(place.worktree)], check=False)
        if moved.returncode == 0:
            admin = new_admin_dir(place)
            env = {"GIT_DIR": str(admin), "GIT_COMMON_DIR": str(place.clone / ".git")}
            switched = await clone.git(
                [
                    "--work-tree",
                    str(place.worktree),
                    "checkout",
                    "--quiet",
                    "--no-track",
                    "-B",
                    place.branch,
                    start,
                ],
                place.worktree,
                env,
                check=False,
            )
            if switched.returncode == 0:
                log.info("worktree taken from the pool", ticket=place.key, entry=entry.name)
                return True
        log.warning("pool entry not usable", ticket=place.key, entry=entry.name, reason=moved.output[-300:])
        for path in (entry, place.worktree):
            await self._unregister(path)
            if path.exists() or path.is_symlink():
                clone.remove_tree(path)
        await clone.git(["worktree", "prune"])
        return False

    async def _clear_way(self, place: TicketPlace, registered: Mapping[Path, _Registered]) -> None:
        """Repair what stands where the ticket's worktree goes: wrong branch, leftovers, other holders."""
        branch_ref = f"refs/heads/{place.branch}"
        for entry in registered.values():
            if entry.path == place.worktree or entry.branch == branch_ref:
                if entry.path == self.repo.clone.resolve():
                    raise WorkspaceError(f"{place.branch} is checked out in the shared clone itself")
                inside(self.root, entry.path)
                log.warning(
                    "worktree repaired",
                    ticket=place.key,
                    path=str(entry.path),
                    branch=entry.branch,
                    reason="wrong branch or place",
                )
                await self._unregister(entry.path)
        if place.worktree.exists() or place.worktree.is_symlink():
            log.warning("worktree repaired", ticket=place.key, path=str(place.worktree), reason="leftover")
            self._clone.remove_tree(place.worktree)
        await self._clone.git(["worktree", "prune"])

    async def _remove_place(self, place: TicketPlace) -> None:
        """Remove a ticket's worktree directory, registration, local branch and record."""
        clone = self._clone
        async with clone.locked():
            if clone.is_cloned() and place.worktree in await self._registered():
                await self._unregister(place.worktree)
            if place.worktree.exists() or place.worktree.is_symlink():
                clone.remove_tree(place.worktree)
            if clone.is_cloned():
                await clone.git(["worktree", "prune"])
                if await clone.rev(f"refs/heads/{place.branch}") is not None:
                    await clone.git(["branch", "--delete", "--force", place.branch], check=False)
            place.state_file.unlink(missing_ok=True)
        log.info("worktree removed", ticket=place.key, path=str(place.worktree))

    async def _unregister(self, path: Path) -> None:
        """`git worktree remove` even when modified or locked; what it leaves is deleted by the caller."""
        await self._clone.git(["worktree", "remove", "--force", "--force", str(path)], check=False)

    async def _drop_stale_base_checkouts(self) -> None:
        """Remove base checkouts a crashed process left (older than a day; younger may be in use)."""
        base_dir = self.repo.worktrees / BASE_DIR
        if not base_dir.is_dir():
            return
        cutoff = time.time() - TEMP_MAX_AGE_SECONDS
        stale = [entry for entry in base_dir.iterdir() if entry.lstat().st_mtime < cutoff]
        if not stale:
            return
        async with self._clone.locked():
            for entry in stale:
                await self._unregister(entry)
                if entry.exists() or entry.is_symlink():
                    self._clone.remove_tree(entry)
            await self._clone.git(["worktree", "prune"])
        log.info("stale base checkouts removed", paths=[str(entry) for entry in stale])

    def _known_places(self) -> list[TicketPlace]:
        """Tickets that have a worktree directory or a record in this workspace."""
        names: set[str] = set()
        tickets_dir = self.repo.worktrees / BRANCH_PREFIX.rstrip("/")
        if tickets_dir.is_dir():
            names.update(entry.name for entry in tickets_dir.iterdir())
        if self.repo.state_dir.is_dir():
            names.update(entry.stem for entry in self.repo.state_dir.glob("*.json"))
        places = []
        for name in sorted(names):
            try:
                place = self.place(name)
            except WorkspaceError:
                log.warning("unknown entry in the workspace", name=name)
                continue
            if place.worktree.name == name or place.state_file.stem == name:
                places.append(place)
        return places


def _last_used(place: TicketPlace) -> float | None:
    """When a ticket's worktree was last prepared, committed or pushed (mtimes), or None."""
    times = []
    for path in (place.state_file, place.worktree):
        with contextlib.suppress(OSError):
            times.append(path.stat().st_mtime)
    return max(times) if times else None


def _resolved(path: str) -> Path:
    return Path(path).resolve()
