"""Builders for real git repositories in tmp_path: a bare origin with commits, pushed as someone else."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

SOMEONE = "someone-else"
_default_home: list[Path] = []

Files = Mapping[str, str | bytes | None]


def git_env(home: Path, name: str = SOMEONE) -> dict[str, str]:
    """An environment for test-side git: its own HOME, no system config, a fixed identity."""
    home.mkdir(parents=True, exist_ok=True)
    return {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "LANG": "C",
        "LC_ALL": "C",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_AUTHOR_NAME": name,
        "GIT_AUTHOR_EMAIL": f"{name}@example.com",
        "GIT_COMMITTER_NAME": name,
        "GIT_COMMITTER_EMAIL": f"{name}@example.com",
    }


def default_env() -> dict[str, str]:
    """git_env with a HOME of its own for this test process (never inside a repository under test)."""
    if not _default_home:
        _default_home.append(Path(tempfile.mkdtemp(prefix="auto-code-git-home-")))
    return git_env(_default_home[0])


def git(cwd: Path, *args: str, env: Mapping[str, str] | None = None, check: bool = True) -> str:
    """Run git in `cwd` and return its stripped stdout; raise with the output when it fails."""
    done = subprocess.run(
        ["git", *args],
        cwd=cwd,
        env=dict(env) if env is not None else default_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed ({done.returncode}): {done.stdout}{done.stderr}")
    return done.stdout.strip()


def write_files(root: Path, files: Files) -> None:
    """Write (str or bytes) or delete (None) files under root."""
    for name, content in files.items():
        path = root / name
        if content is None:
            path.unlink()
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


@dataclass
class Origin:
    """A bare repository playing the remote, and a scratch clone that pushes to it as someone else."""

    path: Path
    scratch: Path
    env: dict[str, str]

    @property
    def url(self) -> str:
        return str(self.path)

    def git(self, *args: str, check: bool = True) -> str:
        """git inside the bare repository."""
        return git(self.path, *args, env=self.env, check=check)

    def sha(self, ref: str) -> str | None:
        """The commit `ref` names in origin, or None."""
        found = self.git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False)
        return found or None

    def commit(
        self, files: Files, message: str = "change", branch: str = "main", start: str | None = None
    ) -> str:
        """Commit `files` on `branch` (created from `start`, default origin's HEAD) and push it."""
        run = self._scratch_git
        run("fetch", "--quiet", "--prune", "origin")
        if start is None:
            start = f"origin/{branch}" if self.sha(f"refs/heads/{branch}") else "origin/HEAD"
        run("checkout", "--quiet", "--force", "-B", branch, start)
        write_files(self.scratch, files)
        run("add", "--all")
        run("commit", "--quiet", "--allow-empty", "-m", message)
        run("push", "--quiet", "origin", f"HEAD:refs/heads/{branch}")
        return run("rev-parse", "HEAD")

    def set_head(self, branch: str) -> None:
        """Make `branch` origin's default branch."""
        self.git("symbolic-ref", "HEAD", f"refs/heads/{branch}")

    def _scratch_git(self, *args: str) -> str:
        return git(self.scratch, *args, env=self.env)


def make_origin(
    root: Path, files: Files | None = None, *, branch: str = "main", name: str = "origin.git"
) -> Origin:
    """A bare origin under `root` whose `branch` holds one commit of `files` (a README by default)."""
    root.mkdir(parents=True, exist_ok=True)
    env = git_env(root / ".githome")
    path = root / name
    git(root, "init", "--quiet", "--bare", f"--initial-branch={branch}", str(path), env=env)
    scratch = root / f"{name}-scratch"
    git(root, "init", "--quiet", f"--initial-branch={branch}", str(scratch), env=env)
    git(scratch, "remote", "add", "origin", str(path), env=env)
    write_files(scratch, files if files is not None else {"README.md": "# demo\n"})
    git(scratch, "add", "--all", env=env)
    git(scratch, "commit", "--quiet", "-m", "initial", env=env)
    git(scratch, "push", "--quiet", "origin", f"HEAD:refs/heads/{branch}", env=env)
    git(scratch, "remote", "set-head", "origin", branch, env=env)
    return Origin(path=path, scratch=scratch, env=env)


def install_hook(hooks_dir: Path, name: str, script: str) -> Path:
    """Write an executable hook `name` running `script` under /bin/sh."""
    hooks_dir.mkdir(parents=True, exist_ok=True)
    hook = hooks_dir / name
    hook.write_text(f"#!/bin/sh\n{script}\n")
    hook.chmod(0o755)
    return hook
