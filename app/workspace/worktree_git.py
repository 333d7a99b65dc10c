"""Git on a ticket's worktree, which sandboxed code can write. Nothing there is trusted: git's dirs are
named from the service's record (the admin dir git made before any sandbox ran), never discovered; the
worktree's .git file, the admin dir, its `commondir` and any per-worktree config are checked before every
command, and a rewrite is refused with SandboxTampered. The branch's commit is read from the clone, whose
.git the sandbox cannot write, never from the worktree's HEAD.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

from app import proc
from app.errors import SandboxTampered, WorkspaceError
from app.logger import get_logger
from app.workspace.clone import SharedClone
from app.workspace.places import ADMIN_NAME, RepoPlace, TicketPlace, TicketState

log = get_logger(__name__)


async def worktree_git(
    clone: SharedClone,
    place: TicketPlace,
    args: Sequence[str],
    extra_env: Mapping[str, str] | None = None,
    *,
    check: bool = True,
    input: bytes | None = None,
) -> proc.Completed:
    """git on a ticket's worktree, its git dirs named from the service's record, never discovered."""
    admin = checked_admin_dir(place)
    env = {
        "GIT_DIR": str(admin),
        "GIT_COMMON_DIR": str(place.clone / ".git"),
        "GIT_WORK_TREE": str(place.worktree),
        "GIT_PAGER": "cat",
        **(extra_env or {}),
    }
    return await clone.git(args, place.worktree, env, check=check, input=input)


async def branch_head(clone: SharedClone, place: TicketPlace) -> str:
    """The ticket branch's commit, read from the clone (the worktree's HEAD is the sandbox's)."""
    head = await clone.rev(f"refs/heads/{place.branch}")
    if head is None:
        raise WorkspaceError(f"the branch {place.branch} of {place.key} has no commit")
    return head


def refuse_a_replaced_marker(place: TicketPlace) -> None:
    """A worktree whose .git is there but is no longer a plain file was rewritten from the sandbox."""
    marker = place.worktree / ".git"
    if os.path.lexists(marker) and (marker.is_symlink() or not marker.is_file()):
        raise SandboxTampered(f"the worktree of {place.key} was tampered with: .git is not a file")


def new_admin_dir(place: TicketPlace) -> Path:
    """The admin dir git just made for a new worktree (read once, before any sandbox ran)."""
    admin = _pointed_admin_dir(place)
    if admin is None:
        raise WorkspaceError(f"git made no usable admin dir for the worktree of {place.key}")
    return checked_admin_dir(place, admin.name)


def checked_admin_dir(place: TicketPlace, name: str | None = None) -> Path:
    """The worktree's admin dir, after checking every file there that could redirect git.

    `name` comes from the service's record; without one (a record from before it was kept) the
    .git file names it, checked the same way. Sandboxed code that rewrote the .git file, pointed
    `commondir` elsewhere or added a per-worktree config is refused with SandboxTampered.
    """
    if name is None:
        state = TicketState.load(place.state_file)
        name = state.admin if state else None
    admins = _admin_dirs(place.repo)
    pointed = _pointed_admin_dir(place)
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
    if commondir.is_symlink() or (admin / common).resolve() != (place.clone / ".git").resolve():
        problems.append("commondir points away from the clone")
    for extra in ("config.worktree", "config"):
        if os.path.lexists(admin / extra):
            problems.append(f"a per-worktree {extra} was added")
    if problems:
        log.error("sandbox tampered with git files", ticket=place.key, problems=problems)
        raise SandboxTampered(f"the worktree of {place.key} was tampered with: {'; '.join(problems)}")
    return admin


def _pointed_admin_dir(place: TicketPlace) -> Path | None:
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
    admins = _admin_dirs(place.repo)
    if admin.parent != admins or not ADMIN_NAME.fullmatch(admin.name):
        return None
    return admin


def _admin_dirs(repo: RepoPlace) -> Path:
    """Where git keeps the worktrees' admin dirs (the clone's .git is read-only to the sandbox)."""
    return (repo.clone / ".git" / "worktrees").resolve()
