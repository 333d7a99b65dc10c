"""What a ticket's run changed, its commit and its push: staging into a temporary index, the diff, the
commit made with commit-tree and a compare-and-swap on the branch, and a push leased on the remote sha.
It trusts nothing in the worktree: the index is seeded from the branch in the clone (the worktree's own
index and HEAD are the sandbox's), every git command on the worktree goes through worktree_git's checks,
and ignored, oversized, oddly named and CI configuration files are left out.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from app.agent.guard import is_ci_config_path
from app.errors import CommandError, PushRejected, WorkspaceError
from app.logger import get_logger
from app.models import Ticket
from app.workspace.clone import SharedClone
from app.workspace.places import SHA, TicketPlace, TicketState, WorkspaceConfig, check_key
from app.workspace.worktree_git import branch_head, checked_admin_dir, worktree_git

log = get_logger(__name__)


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


class Unset:
    """Marks an argument the caller left out (None has a meaning of its own)."""


UNSET: Final = Unset()


async def changes(clone: SharedClone, place: TicketPlace, start_commit: str) -> Changes:
    """What committing now would record since the start commit: files, counts, diff, skipped."""
    diff = [
        "diff",
        "--cached",
        "--no-renames",
        "--no-ext-diff",
        "--no-textconv",
        "--no-color",
        "--ignore-submodules=all",
    ]
    async with _staged(clone, place) as (index_env, skipped):
        names = await worktree_git(clone, place, [*diff, "--name-status", "-z", start_commit], index_env)
        counts = await worktree_git(clone, place, [*diff, "--numstat", "-z", start_commit], index_env)
        text = await worktree_git(clone, place, [*diff, start_commit], index_env)
    return Changes(files=file_changes(names.stdout, counts.stdout), diff=text.stdout, skipped=skipped)


async def commit(clone: SharedClone, place: TicketPlace, start_commit: str, ticket: Ticket) -> str | None:
    """Commit every change but ignored and oversized files; the sha, or None when nothing changed."""
    if check_key(ticket.key) != place.key:
        raise WorkspaceError(f"ticket {ticket.key} does not own the worktree of {place.key}")
    head = await branch_head(clone, place)
    async with _staged(clone, place) as (index_env, skipped):
        same = await worktree_git(
            clone, place, ["diff-index", "--cached", "--quiet", head, "--"], index_env, check=False
        )
        if same.returncode not in (0, 1):
            raise CommandError(same.argv, same.returncode, same.output)
        if same.returncode == 0:
            # A re-run after a crash: what this run committed before is the answer.
            if head != start_commit and await clone.is_ancestor(start_commit, head):
                log.info("commit already made", ticket=place.key, commit=head)
                return head
            log.info("nothing to commit", ticket=place.key, skipped=[s.path for s in skipped])
            return None
        tree = (await clone.git(["write-tree"], None, index_env)).stdout.strip()
        config = clone.config
        identity = {
            "GIT_AUTHOR_NAME": config.author_name,
            "GIT_AUTHOR_EMAIL": config.author_email,
            "GIT_COMMITTER_NAME": config.author_name,
            "GIT_COMMITTER_EMAIL": config.author_email,
        }
        made = await clone.git(
            ["commit-tree", "--no-gpg-sign", tree, "-p", head, "-F", "-"],
            None,
            identity,
            input=commit_message(ticket).encode(),
        )
        sha = made.stdout.strip()
        # Compare-and-swap: the branch moves only from the HEAD we staged against.
        await clone.git(
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
    await worktree_git(clone, place, ["read-tree", sha])
    _touch(place.state_file)
    log.info("changes committed", ticket=place.key, commit=sha, skipped=[s.path for s in skipped])
    return sha


async def push(
    clone: SharedClone,
    place: TicketPlace,
    prepared: TicketState,
    expected_remote: str | Unset | None = UNSET,
) -> str:
    """Push `ticket/<key>` only, leased on the remote sha we know; return the pushed sha.

    The lease is `expected_remote` when given (None: the branch must not exist yet), else the sha
    this service last pushed, else the remote sha recorded when the worktree was prepared. `prepared`
    is the worktree as it was prepared; it stands in for the service's record when that is lost.
    """
    clone.ensure_service_dirs()
    checked_admin_dir(place)  # the branch is read from the clone; a tampered worktree is still refused
    head = await branch_head(clone, place)
    state = TicketState.load(place.state_file) or prepared
    if isinstance(expected_remote, Unset):
        expected_remote = state.pushed or prepared.remote_head
    expected = expected_remote
    if expected is not None and not SHA.fullmatch(expected):
        raise WorkspaceError(f"not a commit id for the lease: {expected[:60]!r}")
    ref = f"refs/heads/{place.branch}"
    # Pushed to the URL, not the remote's name, so the shared clone's refs are not written here
    # (no clone lock needed while the network is slow).
    argv = ["push", "--porcelain", "--no-verify", f"--force-with-lease={ref}:{expected or ''}"]
    try:
        await clone.git([*argv, "--", clone.origin, f"{head}:{ref}"], network=True)
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


# --- staging without touching the worktree's index ----------------------------------------------


@contextlib.asynccontextmanager
async def _staged(
    clone: SharedClone, place: TicketPlace
) -> AsyncIterator[tuple[dict[str, str], tuple[SkippedFile, ...]]]:
    """Stage every committable change into a temporary index (HEAD plus the worktree's files)."""
    clone.temp.mkdir(parents=True, exist_ok=True)
    index = clone.temp / f"index-{place.key.lower()}-{secrets.token_hex(6)}"
    index_env = {"GIT_INDEX_FILE": str(index)}
    cwd = place.worktree
    try:
        # Seeded from the branch in the clone: the worktree's own index and HEAD are the sandbox's.
        await clone.git(["read-tree", f"refs/heads/{place.branch}"], None, index_env)
        status = await worktree_git(
            clone,
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
        present, missing, skipped = _sort_paths(clone.config, cwd, status_paths(status.stdout))
        if present:
            ignored = await _ignored(clone, place, present, index_env)
            skipped += [SkippedFile(path, "ignored by .gitignore") for path in present if path in ignored]
            present = [path for path in present if path not in ignored]
        literal = ["--literal-pathspecs"]
        from_stdin = ["--pathspec-from-file=-", "--pathspec-file-nul"]
        if present:
            await worktree_git(
                clone, place, [*literal, "add", "--all", *from_stdin], index_env, input=_nul_joined(present)
            )
        if missing:
            await worktree_git(
                clone,
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
    config: WorkspaceConfig, worktree: Path, paths: Sequence[str]
) -> tuple[list[str], list[str], list[SkippedFile]]:
    """Split changed paths into present, missing (deleted) and skipped (too big, unreadable)."""
    present: list[str] = []
    missing: list[str] = []
    skipped: list[SkippedFile] = []
    limit = config.max_file_bytes
    for path in paths:
        if not config.allow_ci_config_writes and is_ci_config_path(path):
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
    clone: SharedClone, place: TicketPlace, paths: Sequence[str], index_env: Mapping[str, str]
) -> set[str]:
    """The paths .gitignore excludes (a file HEAD tracks is never ignored)."""
    checked = await worktree_git(
        clone, place, ["check-ignore", "-z", "--stdin"], index_env, check=False, input=_nul_joined(paths)
    )
    if checked.returncode not in (0, 1):
        raise CommandError(checked.argv, checked.returncode, checked.output)
    return {path for path in checked.stdout.split("\0") if path}


def _nul_joined(paths: Sequence[str]) -> bytes:
    return b"".join(path.encode() + b"\0" for path in paths)


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.utime(path)
