"""The shared clone of one repository and every git command the service runs: cloning and fetching, the
clone-wide lock, the service's own directories and the askpass script. It trusts only the service's own
files: every git command gets a fixed configuration (no hooks, fsmonitor, stored credentials, pagers or
external diff) and an environment built for that call, with the token only for network commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import time
import weakref
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import filelock

from app import proc
from app.errors import CommandError, WorkspaceError
from app.logger import get_logger
from app.workspace.places import (
    DEFAULT_REPO_ID,
    SERVICE_DIR,
    RepoPlace,
    WorkspaceConfig,
    check_branch_name,
    inside,
)

log = get_logger(__name__)

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


class SharedClone:
    """One repository's shared clone, its lock and the service's files, and the one way to run git."""

    def __init__(
        self,
        config: WorkspaceConfig,
        token: str | None = None,
        *,
        repo_id: str = DEFAULT_REPO_ID,
        git: str = "git",
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self._token = token or None
        self._git_bin = git
        self.repo = RepoPlace.of(config.workspace_dir, repo_id)
        self.root = self.repo.workspace_dir
        self._service_dir = self.root / SERVICE_DIR
        self._home = self._service_dir / "home"
        self.temp = self._service_dir / "tmp"
        self._askpass = self._service_dir / "askpass"
        self.origin = origin_url(config)
        self._remote_is_http = urlsplit(self.origin).scheme in ("http", "https")
        if config.base_branch is not None:
            check_branch_name(config.base_branch)
        source = os.environ if environ is None else environ
        self._passthrough = {name: source[name] for name in PASSTHROUGH_ENV if name in source}
        self._path = source.get("PATH", os.defpath)
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )

    # --- running git ----------------------------------------------------------------------------

    async def git(
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
            timeout=self.config.git_timeout,
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

    async def rev(self, ref: str, cwd: Path | None = None) -> str | None:
        """The commit a ref names, or None when there is none."""
        found = await self.git(["rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], cwd, check=False)
        return found.stdout.strip() or None if found.returncode == 0 else None

    async def is_ancestor(self, older: str, newer: str, cwd: Path | None = None) -> bool:
        """True when `older` is `newer` or one of its ancestors."""
        checked = await self.git(["merge-base", "--is-ancestor", older, newer], cwd, check=False)
        if checked.returncode not in (0, 1):
            raise CommandError(checked.argv, checked.returncode, checked.output)
        return checked.returncode == 0

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        """Serialise clone-wide git work: an asyncio lock in this process, a file lock across processes."""
        loop = asyncio.get_running_loop()
        lock = self._locks.get(loop)
        if lock is None:
            lock = self._locks[loop] = asyncio.Lock()
        async with lock:
            self.repo.lock_file.parent.mkdir(parents=True, exist_ok=True)
            file_lock = filelock.AsyncFileLock(str(self.repo.lock_file), timeout=self.config.git_timeout)
            try:
                await file_lock.acquire()
            except filelock.Timeout:
                raise WorkspaceError(f"timed out waiting for the lock {self.repo.lock_file}") from None
            try:
                yield
            finally:
                await file_lock.release()

    # --- the clone and its base branch ----------------------------------------------------------

    def is_cloned(self) -> bool:
        """True when the shared clone exists."""
        return (self.repo.clone / ".git" / "HEAD").is_file()

    async def sync(self) -> None:
        """Fetch the shared clone, or clone it when missing (into a temporary dir, then renamed)."""
        clone = self.repo.clone
        if self.is_cloned():
            current = await self.git(["config", "--get", "remote.origin.url"], check=False)
            if current.returncode != 0:
                await self.git(["remote", "add", "origin", self.origin])
            elif current.stdout.strip() != self.origin:
                log.warning("origin url changed", clone=str(clone), url=self.origin)
                await self.git(["remote", "set-url", "origin", self.origin])
            await self.git(["fetch", "--prune", "--force", "origin"], network=True)
            return
        if clone.exists() or clone.is_symlink():
            log.warning("removing an unusable clone", clone=str(clone))
            self.remove_tree(clone)
        clone.parent.mkdir(parents=True, exist_ok=True)
        temp = self.temp / f"clone-{secrets.token_hex(6)}"
        try:
            await self.git(["clone", "--no-checkout", "--", self.origin, str(temp)], self.temp, network=True)
            temp.rename(clone)
        finally:
            if temp.exists():
                self.remove_tree(temp)
        log.info("shared clone created", clone=str(clone))

    async def base_branch(self) -> str:
        """BASE_BRANCH when set, else origin's default branch (asked from the remote when unknown)."""
        if self.config.base_branch:
            return self.config.base_branch
        head = ["symbolic-ref", "--quiet", "refs/remotes/origin/HEAD"]
        found = await self.git(head, check=False)
        if found.returncode != 0:
            await self.git(["remote", "set-head", "origin", "--auto"], network=True, check=False)
            found = await self.git(head, check=False)
        ref = found.stdout.strip()
        if found.returncode != 0 or not ref.startswith("refs/remotes/origin/"):
            raise WorkspaceError("cannot tell origin's default branch; set BASE_BRANCH")
        return check_branch_name(ref.removeprefix("refs/remotes/origin/"))

    # --- files the service owns -----------------------------------------------------------------

    def ensure_service_dirs(self) -> None:
        """Create the workspace's own directories and the askpass script (which holds no secret)."""
        for path in (self._home, self.temp, self.repo.lock_file.parent, self.repo.state_dir):
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

    def drop_old_temporaries(self) -> None:
        """Remove temporary files and clones older than a day (younger ones may be another process's)."""
        cutoff = time.time() - TEMP_MAX_AGE_SECONDS
        for entry in self.temp.iterdir():
            with contextlib.suppress(OSError):
                if entry.lstat().st_mtime < cutoff:
                    self.remove_tree(entry)

    def remove_tree(self, path: Path) -> None:
        """Delete a file, symlink or directory that lies inside the workspace (a symlink, not its target)."""
        inside(self.root, path.parent)
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path)
