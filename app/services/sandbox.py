"""Process isolation with bubblewrap for the agent and for the lint and test commands that run its code.

Inside the sandbox a process sees its own pid namespace (the service's /proc/<pid>/environ is not
there), the workspace hidden except its own worktree (plus the shared clone's git metadata, read-only)
and its own home, the service's credential files masked, and a private /tmp. The rest of the file
system is read-only. The network is not isolated: the agent needs the model API and package managers.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from app.logger import get_logger

log = get_logger(__name__)

# Credential files and folders of the service's own user that no sandboxed process may read.
CREDENTIAL_PATHS = (
    ".config/gh",
    ".git-credentials",
    ".gitconfig",
    ".ssh",
    ".aws",
    ".docker",
    ".netrc",
    ".pgpass",
    ".claude",
    ".config/gcloud",
    ".kube",
)
PROBE_TIMEOUT = 10


def probe(bwrap: str | None = None) -> str | None:
    """Return why bubblewrap cannot isolate a process here, or None when it can."""
    binary = bwrap or shutil.which("bwrap")
    if binary is None:
        return "bwrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    argv = [binary, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-pid"]
    try:
        done = subprocess.run(
            [*argv, "--die-with-parent", "true"],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bwrap did not run: {exc}"
    if done.returncode != 0:
        return f"bwrap cannot create namespaces here: {done.stderr.strip()[:300]}"
    return None


def _tool_dirs() -> tuple[Path, ...]:
    """Where the service's Python, its venv and the bundled CLI live."""
    import claude_agent_sdk

    paths = {Path(sys.prefix), Path(sys.base_prefix), Path(claude_agent_sdk.__file__).parent}
    return tuple(sorted(path.resolve() for path in paths))


def _git_dirs(worktree: Path) -> tuple[Path | None, Path | None]:
    """The shared clone's .git and this worktree's own admin dir, read from the worktree's .git file."""
    marker = worktree / ".git"
    if not marker.is_file():
        return None, None
    text = marker.read_text().strip()
    if not text.startswith("gitdir:"):
        return None, None
    admin = Path(text.split(":", 1)[1].strip())
    if not admin.is_absolute():
        admin = (worktree / admin).resolve()
    common = admin.parent.parent if admin.parent.name == "worktrees" else None
    return common, admin


@dataclass(frozen=True)
class Sandbox:
    """Builds the bwrap argv prefix that isolates one working copy."""

    bwrap: str
    workspace_dir: Path
    user_home: Path | None = None
    masked_files: Sequence[Path] = field(default_factory=tuple)
    tool_dirs: Sequence[Path] = field(default_factory=lambda: _tool_dirs())

    def _masks(self) -> list[str]:
        args: list[str] = []
        candidates = [self.user_home / name for name in CREDENTIAL_PATHS] if self.user_home else []
        for path in [*candidates, *self.masked_files]:
            if path.is_dir():
                args += ["--tmpfs", str(path)]
            elif path.exists():
                args += ["--ro-bind", "/dev/null", str(path)]
        return args

    def prefix(self, worktree: Path, home: Path | None = None) -> list[str]:
        """argv to put before a command so it runs isolated with `worktree` (and `home`) writable."""
        worktree = worktree.resolve()
        args = [
            self.bwrap,
            "--die-with-parent",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--ro-bind", "/", "/",
            "--dev", "/dev",
            "--proc", "/proc",
            "--tmpfs", "/tmp",  # noqa: S108 - a private tmpfs inside the sandbox
            *self._masks(),
            "--tmpfs", str(self.workspace_dir.resolve()),
        ]  # fmt: skip
        # The interpreter, the venv and the CLI stay visible even when they live under a hidden path.
        for tool in self.tool_dirs:
            if tool.is_relative_to("/tmp") or tool.is_relative_to(self.workspace_dir.resolve()):  # noqa: S108
                args += ["--ro-bind", str(tool), str(tool)]
        common, admin = _git_dirs(worktree)
        if common is not None:
            args += ["--ro-bind", str(common), str(common)]
        if admin is not None:
            args += ["--bind", str(admin), str(admin)]
        args += ["--bind", str(worktree), str(worktree)]
        if home is not None:
            home.mkdir(parents=True, exist_ok=True)
            args += ["--bind", str(home.resolve()), str(home.resolve())]
        return [*args, "--chdir", str(worktree), "--"]

    def wrap(self, argv: Sequence[str], cwd: Path) -> list[str]:
        """A command's argv, isolated in the working copy `cwd` (the lint and test gates)."""
        return [*self.prefix(cwd, self.workspace_dir / ".auto-code" / "check-home"), *argv]


def select(
    mode: str, workspace_dir: Path, user_home: Path | None, masked_files: Sequence[Path]
) -> Sandbox | None:
    """The sandbox for SANDBOX=auto|bwrap|off; `bwrap` that cannot work raises, `auto` warns loudly."""
    if mode == "off":
        log.warning("SANDBOX=off: the agent and the checks run without process isolation")
        return None
    problem = probe()
    if problem is not None:
        if mode == "bwrap":
            raise RuntimeError(f"SANDBOX=bwrap but {problem}")
        log.error(
            "process isolation unavailable: agent code could read the service's environment; "
            "see deployment-plan.md to enable it",
            reason=problem,
        )
        return None
    bwrap = shutil.which("bwrap")
    assert bwrap is not None
    return Sandbox(
        bwrap=bwrap, workspace_dir=workspace_dir, user_home=user_home, masked_files=tuple(masked_files)
    )
