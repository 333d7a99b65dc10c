"""Which command names run at all and in which family they are checked, and how a command was reached.

It decides the allowlist's default and what is denied whatever the allowlist says; the families
(no paths, read paths, write paths, toolchains) tell the Bash check which rules read the arguments.
It trusts nothing: a name found here still has its arguments checked by the rules for its family.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ALWAYS_DENIED_COMMANDS = frozenset(
    {
        "curl", "wget", "ssh", "scp", "sftp", "rsync", "nc", "ncat", "netcat", "socat", "telnet", "ftp",
        "lftp", "tftp", "aria2c", "sudo", "su", "doas", "pkexec", "runuser", "docker", "podman",
        "kubectl", "nsenter", "chroot", "unshare", "mount", "umount", "gh", "busybox",
    }
)  # fmt: skip
# Arguments are not paths: nothing is checked but the command name (and -v where it evaluates code).
NO_PATH_COMMANDS = frozenset(
    {
        "echo", "printf", "pwd", "true", "false", ":", "sleep", "seq", "basename", "dirname",
        "expr", "which", "type", "uname", "whoami", "id", "printenv", "tr", "test", "[", "set", "exit",
        "wait", "read",
    }
)  # fmt: skip
# Every positional argument is a path that must resolve inside the worktree.
READ_COMMANDS = frozenset(
    {
        "ls", "cat", "head", "tail", "wc", "cut", "diff", "file", "stat", "realpath", "readlink", "du",
        "nl", "rev", "comm", "join", "paste", "fold", "column", "od", "hexdump", "md5sum", "sha1sum",
        "sha256sum", "sha512sum", "cmp", "base64", "date",
    }
)  # fmt: skip
# Every positional argument and option value is a path the command may write.
WRITE_COMMANDS = frozenset({"mkdir", "touch", "cp", "mv", "rm", "rmdir", "chmod", "ln", "tee"})
DELETE_COMMANDS = frozenset({"rm", "rmdir"})
# Project toolchains: they run project code by design; only path-like arguments are checked.
TOOLCHAINS = frozenset(
    {
        "node", "npm", "npx", "pnpm", "yarn", "corepack", "tsc", "eslint", "prettier", "jest", "vitest",
        "mocha", "ts-node", "tsx", "python", "python3", "pip", "pip3", "uv", "uvx", "poetry", "pipenv",
        "pytest", "ruff", "mypy", "black", "isort", "flake8", "pylint", "tox", "nox", "coverage",
        "make", "cmake", "cargo", "rustc", "rustfmt", "go", "gofmt", "javac", "java", "mvn", "gradle",
        "dotnet", "ruby", "bundle", "rake", "rspec", "php", "composer",
    }
)  # fmt: skip
# Each has its own rule in the Bash check.
_SPECIAL_COMMANDS = frozenset(
    {"cd", "git", "grep", "rg", "find", "sed", "awk", "jq", "sort", "uniq", "tree", "xxd", "xargs",
     "env", "timeout", "nice", "nohup", "time", "command", "exec", "source", "."}
)  # fmt: skip
DEFAULT_ALLOWED_COMMANDS = NO_PATH_COMMANDS | READ_COMMANDS | WRITE_COMMANDS | TOOLCHAINS | _SPECIAL_COMMANDS
SHELLS = frozenset({"bash", "sh", "zsh", "dash", "ksh"})
FILE_PROGRAMS = frozenset({"grep", "rg", "sed", "awk", "jq", "sort", "uniq", "tree", "xxd"})


@dataclass(frozen=True)
class Via:
    """How a command was reached: through which wrapper, and what it does to the arguments."""

    wrapper: str = ""
    stdin_args: bool = False  # xargs appends arguments the policy cannot see
    find_starts: tuple[str, ...] = ()  # find -exec: {} stands for paths under these
    in_find: bool = False

    def through(self, wrapper: str, **changes: Any) -> Via:
        return dataclasses.replace(self, wrapper=wrapper, **changes)
