"""All git for a ticket: the shared clone, a worktree per ticket, changes, commit, push and cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import stat
import time
import weakref
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import filelock

from app import proc
from app.agent.guard import is_ci_config_path
from app.errors import CommandError, PushRejected, SandboxTampered, WorkspaceError
from app.logger import get_logger
from app.models import Ticket, normalise_key

log = get_logger(__name__)

DEFAULT_REPO_ID = "default"
BRANCH_PREFIX = "ticket/"
SERVICE_DIR = ".auto-code"
BASE_DIR = "base"  # under the worktrees dir, beside "ticket/": throwaway checkouts of a start commit
TOKEN_ENV = "AUTO_CODE_GIT_TOKEN"  # noqa: S105 - the variable's name, not a secret
ASKPASS_USERNAME = "x-access-token"
# Given to every git command: never run the target repository's hooks or an fsmonitor daemon, never
# consult a stored credential, and never start an automatic gc (it repacks refs under a concurrent fetch).
GIT_CONFIG: Final = (
    "core.hooksPath=/dev/null",
    "core.fsmonitor=false",
    "credential.helper=",
    "gc.auto=0",
    "maintenance.auto=false",
    "advice.detachedHead=false",
    # The worktree is written by sandboxed code: nothing git reads there may choose a program or a cache.
    "core.untrackedCache=false",
    "core.splitIndex=false",
    "core.pager=cat",
    "diff.external=",
    "diff.ignoreSubmodules=all",
    "submodule.recurse=false",
    "status.submoduleSummary=false",
    "protocol.ext.allow=never",
)
# Variables of the service's environment that git may see: the CA bundle, proxies and an ssh agent.
PASSTHROUGH_ENV = (
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "GIT_SSL_CAINFO",
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
    "SSH_AUTH_SOCK",
    "GIT_SSH_COMMAND",
    "TZ",
)
# Prints the user name, then the token from the environment of the one git process that asks; the file
# itself holds no secret.
ASKPASS_SCRIPT = f"""#!/bin/sh
# Written by auto-code. git runs it for credential prompts; the token comes from the environment.
case "$1" in
  Username*) printf '%s\\n' '{ASKPASS_USERNAME}' ;;
  *) printf '%s\\n' "${TOKEN_ENV}" ;;
esac
"""
TEMP_MAX_AGE_SECONDS = 24 * 3600
_REPO_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")
_BRANCH_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]{0,199}")
_SHA = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")
_ADMIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass(frozen=True)
class WorkspaceConfig:
    """Where the workspace lives and which repository it serves; no secrets (the token comes apart)."""

    workspace_dir: Path
    repo_url: str | None = None
    repo_dir: Path | None = None
    base_branch: str | None = None
    max_file_bytes: int = 5 * 1024 * 1024
    author_name: str = "auto-code"
    author_email: str = "auto-code@users.noreply.github.com"
    git_timeout: float = 600
    worktree_ttl: timedelta = timedelta(days=7)
    allow_ci_config_writes: bool = False


def check_key(key: str) -> str:
    """Return the normalised Jira key or raise WorkspaceError: only such keys reach git or a path."""
    if not isinstance(key, str):
        raise WorkspaceError(f"a ticket key must be a string, not {type(key).__name__}")
    try:
        return normalise_key(key)
    except ValueError as exc:
        raise WorkspaceError(f"refusing ticket key: {exc}") from None


def check_repo_id(repo_id: str) -> str:
    """Return the repository id or raise WorkspaceError: lower-case letters, digits, '-' and '_'."""
    if not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id):
        raise WorkspaceError(f"not a repository id: {str(repo_id)[:60]!r}")
    return repo_id


def check_branch_name(name: str) -> str:
    """Return a base branch name or raise WorkspaceError when git could read it as anything else."""
    if (
        not _BRANCH_NAME.fullmatch(name)
        or ".." in name
        or "//" in name
        or "/." in name
        or name.endswith(("/", ".", ".lock"))
        or name == "HEAD"
    ):
        raise WorkspaceError(f"not a usable branch name: {name[:60]!r}")
    return name


def inside(root: Path, path: Path) -> Path:
    """Return `path` resolved, or raise WorkspaceError when it leaves `root` (symlinks included)."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise WorkspaceError(f"path {path} resolves outside the workspace {root}")
    return resolved


@dataclass(frozen=True)
class RepoPlace:
    """Where one repository's shared clone, worktrees, lock and ticket records live."""

    repo_id: str
    workspace_dir: Path
    clone: Path
    worktrees: Path
    lock_file: Path
    state_dir: Path

    @classmethod
    def of(cls, workspace_dir: Path, repo_id: str = DEFAULT_REPO_ID) -> RepoPlace:
        """The layout: "default" keeps the original `<ws>/repo` and `<ws>/worktrees`; others nest."""
        repo_id = check_repo_id(repo_id)
        root = workspace_dir.expanduser().resolve()
        base = root if repo_id == DEFAULT_REPO_ID else root / "repos" / repo_id
        place = cls(
            repo_id=repo_id,
            workspace_dir=root,
            clone=base / "repo",
            worktrees=base / "worktrees",
            lock_file=root / SERVICE_DIR / "locks" / f"{repo_id}.lock",
            state_dir=root / SERVICE_DIR / "tickets" / repo_id,
        )
        for path in (place.clone, place.worktrees, place.lock_file, place.state_dir):
            inside(root, path)
        return place


@dataclass(frozen=True)
class TicketPlace:
    """Every name and path of one ticket, derived in this one place from its key and repository."""

    key: str
    repo: RepoPlace
    branch: str
    worktree: Path
    state_file: Path

    @classmethod
    def of(cls, key: str, workspace_dir: Path, repo_id: str = DEFAULT_REPO_ID) -> TicketPlace:
        """Validate the key and build `ticket/<key>` and `<worktrees>/ticket/<key>` from it."""
        return cls.within(check_key(key), RepoPlace.of(workspace_dir, repo_id))

    @classmethod
    def within(cls, key: str, repo: RepoPlace) -> TicketPlace:
        """The ticket's place inside an already built repository place."""
        key = check_key(key)
        branch = BRANCH_PREFIX + key.lower()
        place = cls(
            key=key,
            repo=repo,
            branch=branch,
            worktree=repo.worktrees / branch,
            state_file=repo.state_dir / f"{key.lower()}.json",
        )
        inside(repo.workspace_dir, place.worktree)
        inside(repo.workspace_dir, place.state_file)
        return place

    @property
    def clone(self) -> Path:
        """The shared clone the ticket's worktree belongs to."""
        return self.repo.clone


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


@dataclass(frozen=True)
class FileChange:
    """One changed file: git's status letter (A, M, D, T), lines added and removed, binary or not."""

    path: str
    status: str
    insertions: int
    deletions: int
    binary: bool = False


@dataclass(frozen=True)
class SkippedFile:
    """A file left out of the commit, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class Changes:
    """What the ticket's run changed since its start commit, as it would be committed."""

    files: tuple[FileChange, ...] = ()
    diff: str = ""
    skipped: tuple[SkippedFile, ...] = ()

    @property
    def insertions(self) -> int:
        """Lines added across all files."""
        return sum(change.insertions for change in self.files)

    @property
    def deletions(self) -> int:
        """Lines removed across all files."""
        return sum(change.deletions for change in self.files)

    @property
    def is_empty(self) -> bool:
        """True when nothing would be committed."""
        return not self.files

    def summary(self) -> str:
        """`N files changed, I insertions(+), D deletions(-)`, plus the skipped files."""
        text = (
            f"{len(self.files)} files changed, {self.insertions} insertions(+), {self.deletions} deletions(-)"
        )
        if self.skipped:
            text += f"; {len(self.skipped)} files left out"
        return text

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "files": [vars(change).copy() for change in self.files],
            "insertions": self.insertions,
            "deletions": self.deletions,
            "diff": self.diff,
            "skipped": [vars(skipped).copy() for skipped in self.skipped],
        }


@dataclass
class _TicketState:
    """What the service remembers of a ticket's worktree between calls and restarts (no secrets)."""

    start_commit: str
    base_branch: str
    remote_head: str | None
    pushed: str | None = None
    admin: str | None = None  # the worktree's admin dir under the clone's .git/worktrees, as git made it

    @classmethod
    def load(cls, path: Path) -> _TicketState | None:
        """The record, or None when it is missing or not exactly what this service writes."""
        try:
            data = json.loads(path.read_text())
            state = cls(
                start_commit=data["start_commit"],
                base_branch=check_branch_name(data["base_branch"]),
                remote_head=data.get("remote_head"),
                pushed=data.get("pushed"),
                admin=data.get("admin"),
            )
        except (OSError, ValueError, KeyError, TypeError, WorkspaceError):
            return None
        if state.admin is not None and not (
            isinstance(state.admin, str) and _ADMIN_NAME.fullmatch(state.admin)
        ):
            return None
        shas = (state.start_commit, state.remote_head, state.pushed)
        if not all(sha is None or (isinstance(sha, str) and _SHA.fullmatch(sha)) for sha in shas):
            return None
        return state

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        temp.write_text(json.dumps(vars(self), indent=2))
        os.replace(temp, path)


@dataclass
class _Registered:
    """One entry of `git worktree list --porcelain`."""

    path: Path
    head: str | None = None
    branch: str | None = None
    flags: set[str] = field(default_factory=set)


class _Unset:
    """Marks an argument the caller left out (None has a meaning of its own)."""


UNSET: Final = _Unset()


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
        self._token = token or None
        self._git_bin = git
        self.repo = RepoPlace.of(config.workspace_dir, repo_id)
        self.root = self.repo.workspace_dir
        self._service_dir = self.root / SERVICE_DIR
        self._home = self._service_dir / "home"
        self._temp = self._service_dir / "tmp"
        self._askpass = self._service_dir / "askpass"
        self._origin = origin_url(config)
        self._remote_is_http = urlsplit(self._origin).scheme in ("http", "https")
        if config.base_branch is not None:
            check_branch_name(config.base_branch)
        source = os.environ if environ is None else environ
        self._passthrough = {name: source[name] for name in PASSTHROUGH_ENV if name in source}
        self._path = source.get("PATH", os.defpath)
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )

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
            if sha is not None and not _SHA.fullmatch(sha):
                raise WorkspaceError(f"worktree record for {place.key} holds a bad commit id")
        return place

    def _place_of(self, wt: Worktree) -> TicketPlace:
        """Like _place_of_record, and the worktree must exist."""
        place = self._place_of_record(wt)
        _refuse_a_replaced_marker(place)
        if not (place.worktree / ".git").is_file():
            raise WorkspaceError(f"the worktree of {place.key} is missing: {place.worktree}")
        return place

    # --- lifecycle ------------------------------------------------------------------------------

    async def startup(self) -> None:
        """Create the service's directories, drop old temporary files, prune stale registrations."""
        self._ensure_service_dirs()
        self._drop_old_temporaries()
        if self._has_clone():
            await self._drop_stale_base_checkouts()
            async with self._locked():
                await self._git(["worktree", "prune"])
        log.info("workspace ready", workspace=str(self.root), repo=self.repo.repo_id)

    async def prepare(self, key: str) -> Worktree:
        """Fetch (or clone) and return the ticket's worktree on `ticket/<key>`, reusing a good one."""
        place = self.place(key)
        self._ensure_service_dirs()
        async with self._locked():
            await self._sync_clone()
            base = await self._base_branch()
            base_commit = await self._rev(f"refs/remotes/origin/{base}")
            if base_commit is None:
                raise WorkspaceError(f"base branch {base!r} not found on origin")
            remote_head = await self._rev(f"refs/remotes/origin/{place.branch}")
            await self._git(["worktree", "prune"])
            registered = await self._registered()
            mine = registered.get(place.worktree)
            if mine is not None:
                _refuse_a_replaced_marker(place)
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
                await self._git(
                    ["worktree", "add", "--no-track", "-B", place.branch, str(place.worktree), start]
                )
                state = _TicketState(
                    start_commit=start,
                    base_branch=base,
                    remote_head=remote_head,
                    admin=self._new_admin(place).name,
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
        place = self._place_of(wt)
        diff = [
            "diff",
            "--cached",
            "--no-renames",
            "--no-ext-diff",
            "--no-textconv",
            "--no-color",
            "--ignore-submodules=all",
        ]
        start = wt.start_commit
        async with self._staged(place) as (index_env, skipped):
            names = await self._wgit(place, [*diff, "--name-status", "-z", start], index_env)
            counts = await self._wgit(place, [*diff, "--numstat", "-z", start], index_env)
            text = await self._wgit(place, [*diff, start], index_env)
        return Changes(files=file_changes(names.stdout, counts.stdout), diff=text.stdout, skipped=skipped)

    async def commit(self, wt: Worktree, ticket: Ticket) -> str | None:
        """Commit every change but ignored and oversized files; the sha, or None when nothing changed."""
        place = self._place_of(wt)
        if check_key(ticket.key) != place.key:
            raise WorkspaceError(f"ticket {ticket.key} does not own the worktree of {place.key}")
        head = await self._head(place)
        async with self._staged(place) as (index_env, skipped):
            same = await self._wgit(
                place, ["diff-index", "--cached", "--quiet", head, "--"], index_env, check=False
            )
            if same.returncode not in (0, 1):
                raise CommandError(same.argv, same.returncode, same.output)
            if same.returncode == 0:
                # A re-run after a crash: what this run committed before is the answer.
                if head != wt.start_commit and await self._is_ancestor(wt.start_commit, head):
                    log.info("commit already made", ticket=place.key, commit=head)
                    return head
                log.info("nothing to commit", ticket=place.key, skipped=[s.path for s in skipped])
                return None
            tree = (await self._git(["write-tree"], None, index_env)).stdout.strip()
            identity = {
                "GIT_AUTHOR_NAME": self._config.author_name,
                "GIT_AUTHOR_EMAIL": self._config.author_email,
                "GIT_COMMITTER_NAME": self._config.author_name,
                "GIT_COMMITTER_EMAIL": self._config.author_email,
            }
            made = await self._git(
                ["commit-tree", "--no-gpg-sign", tree, "-p", head, "-F", "-"],
                None,
                identity,
                input=commit_message(ticket).encode(),
            )
            sha = made.stdout.strip()
            # Compare-and-swap: the branch moves only from the HEAD we staged against.
            await self._git(
                [
                    "update-ref",
                    "-m",
                    f"auto-code: commit {place.key}",
                    f"refs/heads/{place.branch}",
                    sha,
                    head,
                ],
            )
        # The worktree's own index follows the new commit; files on disk stay as they are.
        await self._wgit(place, ["read-tree", sha])
        self._touch(place.state_file)
        log.info("changes committed", ticket=place.key, commit=sha, skipped=[s.path for s in skipped])
        return sha

    async def push(self, wt: Worktree, expected_remote: str | _Unset | None = UNSET) -> str:
        """Push `ticket/<key>` only, leased on the remote sha we know; return the pushed sha.

        The lease is `expected_remote` when given (None: the branch must not exist yet), else the sha
        this service last pushed, else the remote sha recorded when the worktree was prepared.
        """
        place = self._place_of(wt)
        self._ensure_service_dirs()
        self._admin(place)  # the branch is read from the clone; a tampered worktree is still refused
        head = await self._head(place)
        state = _TicketState.load(place.state_file) or _TicketState(
            start_commit=wt.start_commit, base_branch=wt.base_branch, remote_head=wt.remote_head
        )
        if isinstance(expected_remote, _Unset):
            expected_remote = state.pushed or wt.remote_head
        expected = expected_remote
        if expected is not None and not _SHA.fullmatch(expected):
            raise WorkspaceError(f"not a commit id for the lease: {expected[:60]!r}")
        ref = f"refs/heads/{place.branch}"
        # Pushed to the URL, not the remote's name, so the shared clone's refs are not written here
        # (no clone lock needed while the network is slow).
        argv = ["push", "--porcelain", "--no-verify", f"--force-with-lease={ref}:{expected or ''}"]
        try:
            await self._git([*argv, "--", self._origin, f"{head}:{ref}"], network=True)
        except CommandError as exc:
            reason = push_rejection(exc.output)
            if reason is None:
                raise
            log.warning("push rejected", ticket=place.key, branch=place.branch, reason=reason)
            raise PushRejected(f"push of {place.branch} rejected: {reason}") from None
        state.pushed = head
        state.save(place.state_file)
        log.info("branch pushed", ticket=place.key, branch=place.branch, commit=head, lease=expected)
        return head

    @contextlib.asynccontextmanager
    async def base_checkout(self, wt: Worktree) -> AsyncIterator[Path]:
        """A throwaway detached checkout of the run's start commit, removed on exit (for baselines)."""
        place = self._place_of_record(wt)
        self._ensure_service_dirs()
        path = inside(
            self.root, self.repo.worktrees / BASE_DIR / f"{place.key.lower()}-{secrets.token_hex(4)}"
        )
        async with self._locked():
            path.parent.mkdir(parents=True, exist_ok=True)
            await self._git(["worktree", "add", "--detach", str(path), wt.start_commit])
        try:
            yield path
        finally:
            async with self._locked():
                await self._unregister(path)
                if path.exists():
                    self._remove_tree(path)
                await self._git(["worktree", "prune"])

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
        if self._has_clone():
            await self._drop_stale_base_checkouts()
            async with self._locked():
                # The one place gc may run: under the clone lock, in the foreground.
                gc = ["-c", "gc.auto=6700", "-c", "gc.autoDetach=false", "gc", "--auto", "--quiet"]
                await self._git(gc, check=False)
        log.info("expired worktrees removed", removed=[str(path) for path in removed], kept=sorted(kept))
        return removed

    # --- clone, base branch, worktrees ----------------------------------------------------------

    async def _sync_clone(self) -> None:
        """Fetch the shared clone, or clone it when missing (into a temporary dir, then renamed)."""
        clone = self.repo.clone
        if self._has_clone():
            current = await self._git(["config", "--get", "remote.origin.url"], check=False)
            if current.returncode != 0:
                await self._git(["remote", "add", "origin", self._origin])
            elif current.stdout.strip() != self._origin:
                log.warning("origin url changed", clone=str(clone), url=self._origin)
                await self._git(["remote", "set-url", "origin", self._origin])
            await self._git(["fetch", "--prune", "--force", "origin"], network=True)
            return
        if clone.exists() or clone.is_symlink():
            log.warning("removing an unusable clone", clone=str(clone))
            self._remove_tree(clone)
        clone.parent.mkdir(parents=True, exist_ok=True)
        temp = self._temp / f"clone-{secrets.token_hex(6)}"
        try:
            await self._git(
                ["clone", "--no-checkout", "--", self._origin, str(temp)], self._temp, network=True
            )
            temp.rename(clone)
        finally:
            if temp.exists():
                self._remove_tree(temp)
        log.info("shared clone created", clone=str(clone))

    async def _base_branch(self) -> str:
        """BASE_BRANCH when set, else origin's default branch (asked from the remote when unknown)."""
        if self._config.base_branch:
            return self._config.base_branch
        head = ["symbolic-ref", "--quiet", "refs/remotes/origin/HEAD"]
        found = await self._git(head, check=False)
        if found.returncode != 0:
            await self._git(["remote", "set-head", "origin", "--auto"], network=True, check=False)
            found = await self._git(head, check=False)
        ref = found.stdout.strip()
        if found.returncode != 0 or not ref.startswith("refs/remotes/origin/"):
            raise WorkspaceError("cannot tell origin's default branch; set BASE_BRANCH")
        return check_branch_name(ref.removeprefix("refs/remotes/origin/"))

    async def _registered(self) -> dict[Path, _Registered]:
        """The clone's worktrees by resolved path."""
        listed = await self._git(["worktree", "list", "--porcelain"])
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
    ) -> _TicketState:
        """The record of a worktree being reused; rebuilt from git when it was lost."""
        state = _TicketState.load(place.state_file)
        admin = self._admin(place, state.admin if state else None).name
        head = await self._head(place)
        if (
            state is not None
            and await self._rev(state.start_commit) is not None
            and await self._is_ancestor(state.start_commit, head)
        ):
            state.admin = admin
            return state
        # Only a remote sha our branch contains may be the lease: pushing over it loses nothing.
        contained = remote_head if remote_head and await self._is_ancestor(remote_head, head) else None
        start = contained
        if start is None:
            merge_base = await self._git(["merge-base", head, base_commit], check=False)
            start = merge_base.stdout.strip() if merge_base.returncode == 0 else head
        log.warning("worktree record rebuilt", ticket=place.key, start=start)
        return _TicketState(start_commit=start, base_branch=base, remote_head=contained, admin=admin)

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
            self._remove_tree(place.worktree)
        await self._git(["worktree", "prune"])

    async def _remove_place(self, place: TicketPlace) -> None:
        """Remove a ticket's worktree directory, registration, local branch and record."""
        async with self._locked():
            if self._has_clone() and place.worktree in await self._registered():
                await self._unregister(place.worktree)
            if place.worktree.exists() or place.worktree.is_symlink():
                self._remove_tree(place.worktree)
            if self._has_clone():
                await self._git(["worktree", "prune"])
                if await self._rev(f"refs/heads/{place.branch}") is not None:
                    await self._git(["branch", "--delete", "--force", place.branch], check=False)
            place.state_file.unlink(missing_ok=True)
        log.info("worktree removed", ticket=place.key, path=str(place.worktree))

    async def _unregister(self, path: Path) -> None:
        """`git worktree remove` even when modified or locked; what it leaves is deleted by the caller."""
        await self._git(["worktree", "remove", "--force", "--force", str(path)], check=False)

    async def _drop_stale_base_checkouts(self) -> None:
        """Remove base checkouts a crashed process left (older than a day; younger may be in use)."""
        base_dir = self.repo.worktrees / BASE_DIR
        if not base_dir.is_dir():
            return
        cutoff = time.time() - TEMP_MAX_AGE_SECONDS
        stale = [entry for entry in base_dir.iterdir() if entry.lstat().st_mtime < cutoff]
        if not stale:
            return
        async with self._locked():
            for entry in stale:
                await self._unregister(entry)
                if entry.exists() or entry.is_symlink():
                    self._remove_tree(entry)
            await self._git(["worktree", "prune"])
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

    # --- staging without touching the worktree's index ------------------------------------------

    @contextlib.asynccontextmanager
    async def _staged(
        self, place: TicketPlace
    ) -> AsyncIterator[tuple[dict[str, str], tuple[SkippedFile, ...]]]:
        """Stage every committable change into a temporary index (HEAD plus the worktree's files)."""
        self._temp.mkdir(parents=True, exist_ok=True)
        index = self._temp / f"index-{place.key.lower()}-{secrets.token_hex(6)}"
        index_env = {"GIT_INDEX_FILE": str(index)}
        cwd = place.worktree
        try:
            # Seeded from the branch in the clone: the worktree's own index and HEAD are the sandbox's.
            await self._git(["read-tree", f"refs/heads/{place.branch}"], None, index_env)
            status = await self._wgit(
                place,
                [
                    "status",
                    "--porcelain=v1",
                    "-z",
                    "--untracked-files=all",
                    "--no-renames",
                    "--ignore-submodules=all",
                ],
                {**index_env, "GIT_OPTIONAL_LOCKS": "0"},
            )
            present, missing, skipped = self._sort_paths(cwd, status_paths(status.stdout))
            if present:
                ignored = await self._ignored(place, present, index_env)
                skipped += [SkippedFile(path, "ignored by .gitignore") for path in present if path in ignored]
                present = [path for path in present if path not in ignored]
            literal = ["--literal-pathspecs"]
            from_stdin = ["--pathspec-from-file=-", "--pathspec-file-nul"]
            if present:
                await self._wgit(
                    place, [*literal, "add", "--all", *from_stdin], index_env, input=_nul_joined(present)
                )
            if missing:
                await self._wgit(
                    place,
                    [*literal, "rm", "--cached", "--quiet", "--ignore-unmatch", *from_stdin],
                    index_env,
                    input=_nul_joined(missing),
                )
            yield index_env, tuple(skipped)
        finally:
            index.unlink(missing_ok=True)
            index.with_name(index.name + ".lock").unlink(missing_ok=True)

    def _sort_paths(
        self, worktree: Path, paths: Sequence[str]
    ) -> tuple[list[str], list[str], list[SkippedFile]]:
        """Split changed paths into present, missing (deleted) and skipped (too big, unreadable)."""
        present: list[str] = []
        missing: list[str] = []
        skipped: list[SkippedFile] = []
        limit = self._config.max_file_bytes
        for path in paths:
            if not self._config.allow_ci_config_writes and is_ci_config_path(path):
                # Toolchains the agent runs could have written it; a pushed workflow runs with secrets.
                skipped.append(SkippedFile(path, "CI configuration (ALLOW_CI_CONFIG_WRITES is off)"))
                continue
            if "\ufffd" in path:
                skipped.append(SkippedFile(path, "file name is not valid UTF-8"))
                continue
            if path.endswith("/"):
                skipped.append(SkippedFile(path, "nested git repository"))
                continue
            try:
                info = os.lstat(worktree / path)
            except (FileNotFoundError, NotADirectoryError):
                missing.append(path)
                continue
            if stat.S_ISREG(info.st_mode) and info.st_size > limit:
                skipped.append(SkippedFile(path, f"larger than max_file_bytes ({info.st_size} > {limit})"))
            else:
                present.append(path)
        return present, missing, skipped

    async def _ignored(
        self, place: TicketPlace, paths: Sequence[str], index_env: Mapping[str, str]
    ) -> set[str]:
        """The paths .gitignore excludes (a file HEAD tracks is never ignored)."""
        checked = await self._wgit(
            place, ["check-ignore", "-z", "--stdin"], index_env, check=False, input=_nul_joined(paths)
        )
        if checked.returncode not in (0, 1):
            raise CommandError(checked.argv, checked.returncode, checked.output)
        return {path for path in checked.stdout.split("\0") if path}

    # --- the worktree's git files, which sandboxed code can write ------------------------------

    def _new_admin(self, place: TicketPlace) -> Path:
        """The admin dir git just made for a new worktree (read once, before any sandbox ran)."""
        admin = self._pointed_admin(place)
        if admin is None:
            raise WorkspaceError(f"git made no usable admin dir for the worktree of {place.key}")
        return self._admin(place, admin.name)

    def _pointed_admin(self, place: TicketPlace) -> Path | None:
        """The admin dir the worktree's .git file names, when it is a direct child of worktrees/."""
        marker = place.worktree / ".git"
        try:
            if not stat.S_ISREG(marker.lstat().st_mode):
                return None
            text = marker.read_text()
        except (OSError, UnicodeDecodeError):
            return None
        if not text.startswith("gitdir: "):
            return None
        admin = Path(text.removeprefix("gitdir: ").rstrip("\n"))
        admins = self._admins()
        if admin.parent != admins or not _ADMIN_NAME.fullmatch(admin.name):
            return None
        return admin

    def _admins(self) -> Path:
        """Where git keeps the worktrees' admin dirs (the clone's .git is read-only to the sandbox)."""
        return (self.repo.clone / ".git" / "worktrees").resolve()

    def _admin(self, place: TicketPlace, name: str | None = None) -> Path:
        """The worktree's admin dir, after checking every file there that could redirect git.

        `name` comes from the service's record; without one (a record from before it was kept) the
        .git file names it, checked the same way. Sandboxed code that rewrote the .git file, pointed
        `commondir` elsewhere or added a per-worktree config is refused with SandboxTampered.
        """
        if name is None:
            state = _TicketState.load(place.state_file)
            name = state.admin if state else None
        admins = self._admins()
        pointed = self._pointed_admin(place)
        if name is None:
            if pointed is None:
                raise SandboxTampered(f"the .git file of {place.key}'s worktree was rewritten")
            name = pointed.name
        admin = admins / name
        problems = []
        if pointed != admin:
            problems.append("the .git file names another git dir")
        try:
            if not stat.S_ISDIR(admin.lstat().st_mode):
                problems.append("the admin dir is not a directory")
        except OSError:
            problems.append("the admin dir is missing")
        commondir = admin / "commondir"
        try:
            common = commondir.read_text().strip()
        except FileNotFoundError:
            common = ".."
        except (OSError, UnicodeDecodeError):
            common = ""
        if commondir.is_symlink() or (admin / common).resolve() != (self.repo.clone / ".git").resolve():
            problems.append("commondir points away from the clone")
        for extra in ("config.worktree", "config"):
            if os.path.lexists(admin / extra):
                problems.append(f"a per-worktree {extra} was added")
        if problems:
            log.error("sandbox tampered with git files", ticket=place.key, problems=problems)
            raise SandboxTampered(f"the worktree of {place.key} was tampered with: {'; '.join(problems)}")
        return admin

    async def _head(self, place: TicketPlace) -> str:
        """The ticket branch's commit, read from the clone (the worktree's HEAD is the sandbox's)."""
        head = await self._rev(f"refs/heads/{place.branch}")
        if head is None:
            raise WorkspaceError(f"the branch {place.branch} of {place.key} has no commit")
        return head

    async def _wgit(
        self,
        place: TicketPlace,
        args: Sequence[str],
        extra_env: Mapping[str, str] | None = None,
        *,
        check: bool = True,
        input: bytes | None = None,
    ) -> proc.Completed:
        """git on a ticket's worktree, its git dirs named from the service's record, never discovered."""
        admin = self._admin(place)
        env = {
            "GIT_DIR": str(admin),
            "GIT_COMMON_DIR": str(self.repo.clone / ".git"),
            "GIT_WORK_TREE": str(place.worktree),
            "GIT_PAGER": "cat",
            **(extra_env or {}),
        }
        return await self._git(args, place.worktree, env, check=check, input=input)

    # --- running git ----------------------------------------------------------------------------

    async def _git(
        self,
        args: Sequence[str],
        cwd: Path | None = None,
        extra_env: Mapping[str, str] | None = None,
        *,
        network: bool = False,
        check: bool = True,
        input: bytes | None = None,
    ) -> proc.Completed:
        """Run git with the service's fixed configuration and an environment built for this call."""
        argv = [self._git_bin]
        for setting in GIT_CONFIG:
            argv += ["-c", setting]
        return await proc.run(
            [*argv, *args],
            cwd=cwd or self.repo.clone,
            env=self._env(extra_env, network=network),
            timeout=self._config.git_timeout,
            check=check,
            secrets=[self._token] if self._token else [],
            input=input,
        )

    def _env(self, extra: Mapping[str, str] | None, *, network: bool) -> dict[str, str]:
        """PATH, an isolated HOME, no system config, C locale, no prompts; the token only when needed."""
        env = {
            **self._passthrough,
            "PATH": self._path,
            "HOME": str(self._home),
            "XDG_CONFIG_HOME": str(self._home / ".config"),
            "GIT_CONFIG_NOSYSTEM": "1",
            "LANG": "C",
            "LC_ALL": "C",
            "GIT_TERMINAL_PROMPT": "0",
        }
        if network and self._token and self._remote_is_http:
            env["GIT_ASKPASS"] = str(self._askpass)
            env[TOKEN_ENV] = self._token
        if extra:
            env.update(extra)
        return env

    async def _rev(self, ref: str, cwd: Path | None = None) -> str | None:
        """The commit a ref names, or None when there is none."""
        found = await self._git(["rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], cwd, check=False)
        return found.stdout.strip() or None if found.returncode == 0 else None

    async def _is_ancestor(self, older: str, newer: str, cwd: Path | None = None) -> bool:
        """True when `older` is `newer` or one of its ancestors."""
        checked = await self._git(["merge-base", "--is-ancestor", older, newer], cwd, check=False)
        if checked.returncode not in (0, 1):
            raise CommandError(checked.argv, checked.returncode, checked.output)
        return checked.returncode == 0

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        """Serialise clone-wide git work: an asyncio lock in this process, a file lock across processes."""
        loop = asyncio.get_running_loop()
        lock = self._locks.get(loop)
        if lock is None:
            lock = self._locks[loop] = asyncio.Lock()
        async with lock:
            self.repo.lock_file.parent.mkdir(parents=True, exist_ok=True)
            file_lock = filelock.AsyncFileLock(str(self.repo.lock_file), timeout=self._config.git_timeout)
            try:
                await file_lock.acquire()
            except filelock.Timeout:
                raise WorkspaceError(f"timed out waiting for the lock {self.repo.lock_file}") from None
            try:
                yield
            finally:
                await file_lock.release()

    # --- files the service owns -----------------------------------------------------------------

    def _has_clone(self) -> bool:
        return (self.repo.clone / ".git" / "HEAD").is_file()

    def _ensure_service_dirs(self) -> None:
        """Create the workspace's own directories and the askpass script (which holds no secret)."""
        for path in (self._home, self._temp, self.repo.lock_file.parent, self.repo.state_dir):
            inside(self.root, path).mkdir(parents=True, exist_ok=True)
        self._service_dir.chmod(0o700)
        try:
            current = self._askpass.read_text()
        except OSError:
            current = None
        if current != ASKPASS_SCRIPT:
            temp = self._askpass.with_name(f".askpass.{secrets.token_hex(4)}")
            temp.write_text(ASKPASS_SCRIPT)
            temp.chmod(0o700)
            os.replace(temp, self._askpass)

    def _drop_old_temporaries(self) -> None:
        """Remove temporary files and clones older than a day (younger ones may be another process's)."""
        cutoff = time.time() - TEMP_MAX_AGE_SECONDS
        for entry in self._temp.iterdir():
            with contextlib.suppress(OSError):
                if entry.lstat().st_mtime < cutoff:
                    self._remove_tree(entry)

    def _remove_tree(self, path: Path) -> None:
        """Delete a file, symlink or directory that lies inside the workspace (a symlink, not its target)."""
        inside(self.root, path.parent)
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path)

    @staticmethod
    def _touch(path: Path) -> None:
        with contextlib.suppress(OSError):
            os.utime(path)


def _refuse_a_replaced_marker(place: TicketPlace) -> None:
    """A worktree whose .git is there but is no longer a plain file was rewritten from the sandbox."""
    marker = place.worktree / ".git"
    if os.path.lexists(marker) and (marker.is_symlink() or not marker.is_file()):
        raise SandboxTampered(f"the worktree of {place.key} was tampered with: .git is not a file")


def origin_url(config: WorkspaceConfig) -> str:
    """The clone's origin: REPO_URL, else the local REPO_DIR; refuses URLs that carry a password."""
    if config.repo_url:
        url = config.repo_url.strip()
        if url.startswith("-"):
            raise WorkspaceError("REPO_URL must not start with '-'")
        if "://" in url and urlsplit(url).password:
            raise WorkspaceError("REPO_URL carries a password or token; pass the token separately (GH_TOKEN)")
        return url
    if config.repo_dir:
        return str(config.repo_dir.expanduser().resolve())
    raise WorkspaceError("set REPO_URL (or REPO_DIR for a local repository)")


def commit_message(ticket: Ticket) -> str:
    """`KEY: summary` on one line, then a blank line and the ticket's URL."""
    subject = f"{check_key(ticket.key)}: {' '.join(ticket.summary.split())}"
    url = " ".join((ticket.url or "").split())
    return f"{subject}\n\n{url}\n" if url else f"{subject}\n"


def status_paths(porcelain: str) -> list[str]:
    """Paths named by `git status --porcelain=v1 -z` (both sides of a rename), in order, once each."""
    fields = porcelain.split("\0")
    paths: list[str] = []
    index = 0
    while index < len(fields):
        entry = fields[index]
        index += 1
        if len(entry) < 4:
            continue
        paths.append(entry[3:])
        if entry[0] in "RC" and index < len(fields):
            paths.append(fields[index])
            index += 1
    return list(dict.fromkeys(paths))


def file_changes(name_status: str, numstat: str) -> tuple[FileChange, ...]:
    """Join `diff --name-status -z` and `diff --numstat -z` output into FileChange records."""
    counts: dict[str, tuple[int, int, bool]] = {}
    for item in numstat.split("\0"):
        parts = item.split("\t", 2)
        if len(parts) == 3:
            binary = parts[0] == "-"
            counts[parts[2]] = (0 if binary else int(parts[0]), 0 if binary else int(parts[1]), binary)
    fields = [item for item in name_status.split("\0") if item]
    changes = []
    for status, path in zip(fields[0::2], fields[1::2], strict=False):
        insertions, deletions, binary = counts.get(path, (0, 0, False))
        changes.append(FileChange(path, status[:1], insertions, deletions, binary))
    return tuple(changes)


def push_rejection(output: str) -> str | None:
    """The reason a `push --porcelain` was refused, with the remote's messages; None if not refused."""
    refused = []
    remote = []
    for line in output.splitlines():
        if line.startswith("!"):
            refused.append(line.rsplit("\t", 1)[-1].strip())
        elif line.startswith("remote:"):
            message = line.removeprefix("remote:").strip()
            if message:
                remote.append(message)
    if not refused:
        return None
    return "; ".join([*refused, *remote])


def _last_used(place: TicketPlace) -> float | None:
    """When a ticket's worktree was last prepared, committed or pushed (mtimes), or None."""
    times = []
    for path in (place.state_file, place.worktree):
        with contextlib.suppress(OSError):
            times.append(path.stat().st_mtime)
    return max(times) if times else None


def _resolved(path: str) -> Path:
    return Path(path).resolve()


def _nul_joined(paths: Sequence[str]) -> bytes:
    return b"".join(path.encode() + b"\0" for path in paths)
