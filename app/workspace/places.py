"""The workspace's names, paths and records: its configuration, the checked ticket key, repository id and
branch name, where a repository's clone, worktrees, lock and ticket records live, and the record kept of a
ticket's worktree. Nothing here runs git. It trusts no name it has not checked, builds every path from
checked names and refuses one that resolves outside the workspace, and accepts a stored record only when
it is exactly what the service writes.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from app.errors import WorkspaceError
from app.models import normalise_key

DEFAULT_REPO_ID = "default"
BRANCH_PREFIX = "ticket/"
SERVICE_DIR = ".auto-code"
BASE_DIR = "base"  # under the worktrees dir, beside "ticket/": throwaway checkouts of a start commit
SHA = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")
ADMIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_REPO_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")
_BRANCH_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]{0,199}")


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
    # Checkouts of the base kept ready (app/workspace/pool.py), refreshed this often, above this much disk.
    pool_size: int = 0
    pool_refresh: float = 60.0
    pool_min_free_mb: int = 0


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


@dataclass
class TicketState:
    """What the service remembers of a ticket's worktree between calls and restarts (no secrets)."""

    start_commit: str
    base_branch: str
    remote_head: str | None
    pushed: str | None = None
    admin: str | None = None  # the worktree's admin dir under the clone's .git/worktrees, as git made it

    @classmethod
    def load(cls, path: Path) -> TicketState | None:
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
            isinstance(state.admin, str) and ADMIN_NAME.fullmatch(state.admin)
        ):
            return None
        shas = (state.start_commit, state.remote_head, state.pushed)
        if not all(sha is None or (isinstance(sha, str) and SHA.fullmatch(sha)) for sha in shas):
            return None
        return state

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        temp.write_text(json.dumps(vars(self), indent=2))
        os.replace(temp, path)
