"""Process isolation with bubblewrap for the agent and for the lint, test and setup commands it drives.

Inside the sandbox a process sees its own pid namespace (the service's /proc/<pid>/environ is not
there), the workspace hidden except its own worktree (plus the shared clone's git metadata, read-only)
and its own home, the service's credential files masked, and a private /tmp. The rest of the file
system is read-only. It has its own network namespace: only a loopback of its own, no route out, no
DNS, none of the host's loopback listeners. Unix sockets are files, so every directory that holds one
(/run, /var/run and each directory a listening socket of this host lives in) is covered by an empty
tmpfs, or the socket itself by /dev/null where its directory must stay visible. The only ways out are
the sockets of one bridge directory, bound read-only (see app/isolation/fence.py).
"""

from __future__ import annotations

import os
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
# Where sockets live by convention; each listening socket of this host found in /proc/net/unix adds its own.
SOCKET_DIRS = (Path("/run"), Path("/var/run"))
PROC_NET_UNIX = Path("/proc/net/unix")


def probe(bwrap: str | None = None) -> str | None:
    """Return why bubblewrap cannot isolate a process here, or None when it can."""
    binary = bwrap or shutil.which("bwrap")
    if binary is None:
        return "bwrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    argv = [
        binary,
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--unshare-pid",
        "--unshare-net",
    ]
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
        return f"bwrap cannot create namespaces (pid and network) here: {done.stderr.strip()[:300]}"
    return None


def socket_paths(table: Path = PROC_NET_UNIX) -> list[Path]:
    """The file-system paths of this host's Unix sockets (abstract ones stay behind the network namespace)."""
    try:
        lines = table.read_text().splitlines()[1:]
    except OSError:
        return []
    paths = set()
    for line in lines:
        fields = line.split(None, 7)
        if len(fields) == 8 and fields[7].startswith("/"):
            paths.add(Path(fields[7]))
    return sorted(paths)


def socket_masks(sockets: Sequence[Path], keep: Sequence[Path], covered: Sequence[Path] = ()) -> list[str]:
    """bwrap arguments hiding every socket: its directory under a tmpfs, or the socket itself under /dev/null
    when the directory is, or holds, something the sandbox must see (`keep`). Sockets under `covered` (dirs
    that get a tmpfs of their own anyway) are left alone: they come and go, and a vanished mount target
    would stop bwrap."""
    kept = [path.resolve() for path in keep]
    covered = [path.resolve() for path in covered]
    hidden: list[Path] = []
    args: list[str] = []
    for folder in SOCKET_DIRS:
        if folder.is_dir() and not folder.is_symlink():
            hidden.append(folder)
            args += ["--tmpfs", str(folder)]
    for socket in sockets:
        try:
            real = socket.parent.resolve() / socket.name
        except OSError:
            continue
        if any(real.is_relative_to(folder) for folder in [*hidden, *covered]) or not os.path.lexists(real):
            continue
        folder = real.parent
        if folder == Path("/") or any(
            path.is_relative_to(folder) or folder.is_relative_to(path) for path in kept
        ):
            args += ["--ro-bind", "/dev/null", str(real)]
        else:
            hidden.append(folder)
            args += ["--tmpfs", str(folder)]
    return args


def _tool_dirs() -> tuple[Path, ...]:
    """Where the service's Python, its venv, the bundled CLI and the bridge script live."""
    import claude_agent_sdk

    here = Path(__file__).parent  # bridge.py runs inside every sandbox
    paths = {Path(sys.prefix), Path(sys.base_prefix), Path(claude_agent_sdk.__file__).parent, here}
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

    def prefix(
        self,
        worktree: Path,
        home: Path | None = None,
        *,
        bridges: Path | None = None,
        cache: Path | None = None,
        cache_writable: bool = False,
    ) -> list[str]:
        """argv to put before a command so it runs isolated with `worktree` (and `home`) writable.

        `bridges` is the one directory of sockets that leads out (read-only); `cache` a package cache kept
        outside the worktree, writable only for the setup command.
        """
        worktree = worktree.resolve()
        keep = [worktree, self.workspace_dir, *self.tool_dirs, *([home] if home else [])]
        args = [
            self.bwrap,
            "--die-with-parent",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-net",
            "--ro-bind", "/", "/",
            "--dev", "/dev",
            "--proc", "/proc",
            "--tmpfs", "/tmp",  # noqa: S108 - a private tmpfs inside the sandbox
            *socket_masks(socket_paths(), keep, covered=[Path("/tmp"), self.workspace_dir]),  # noqa: S108
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
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            args += ["--bind" if cache_writable else "--ro-bind", str(cache.resolve()), str(cache.resolve())]
        if bridges is not None:
            args += ["--ro-bind", str(bridges.resolve()), str(bridges.resolve())]
        return [*args, "--chdir", str(worktree), "--"]


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
            "process isolation unavailable: UNFENCED, agent code could read the service's environment "
            "and reach any host; see deployment-plan.md to enable it",
            reason=problem,
        )
        return None
    bwrap = shutil.which("bwrap")
    assert bwrap is not None
    return Sandbox(
        bwrap=bwrap, workspace_dir=workspace_dir, user_home=user_home, masked_files=tuple(masked_files)
    )
