"""The agent's command and file policy (a PreToolUse hook) and the scrubbed environment of its CLI.

Parser: tree-sitter-bash, not bashlex. bashlex's last release is from 2023, it raises on much valid bash
(arithmetic, `case`, here-documents in compound commands) and gives no partial tree. tree-sitter-bash is
maintained, covers the whole grammar and is error-tolerant with explicit ERROR/MISSING nodes, which the
policy reads as "could not parse -> deny". Where its tree differs from what bash runs (the body of a
backtick substitution, a backslash-newline inside a word), the policy re-parses the text or denies.

Bash rules: every command anywhere in the tree (lists, pipelines, subshells, groups, substitutions, loop
and `if` bodies, here-documents) must pass, and syntax the policy does not know is denied. Command names
are literal words from an allowlist (defaults plus AGENT_ALLOWED_COMMANDS), never expansions; network,
privilege and container tools, `eval`, `git push/remote/config/credential` and `git -c` are denied
whatever the allowlist says. Wrappers (`env`, `xargs`, `find -exec`, `timeout`, `nice`, `nohup`, `time`,
`command`, `exec`, `bash -c`, `npx`, `uv run`, ...) are unwrapped and the inner command checked; behind
xargs or find's `{}` only commands that unseen arguments cannot redirect may run. File commands need
literal paths; paths, redirect targets and `cd` targets must resolve (symlinks and globs followed) inside
the worktree, and writes must stay out of `.git/` and CI configuration. Options are read as each command
reads them: the file programs (grep, rg, sed, sort, tree, jq) declare every long option they have, GNU
abbreviations (`--outp` for `--output`) resolve to the full name, and an unknown or ambiguous option, or
an expansion where a command reads options, is denied; an unquoted pattern must expand to names in the
worktree that cannot read as options. Denied by choice: function definitions (a function can shadow an
allowed name), background jobs, `exec` redirections, shells reading commands from stdin, `set -k` and
history expansion, `find -execdir`, and arithmetic or `test -v` on variables (bash runs a variable
holding `a[$(cmd)]` as code there). `./script` or `bash script.sh` runs when the script resolves inside
the worktree: it is project code, like `npm test`.

What the policy is not: toolchains (python, node, make, npm scripts, ...) run code the agent wrote, and
package managers download from the network; the policy lets them run by design and cannot see what they
do. Process isolation and the network rules are the boundary for that code, and the commit step should
re-check the diff for CI configuration (`is_ci_config_path`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import itertools
import json
import os
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import tree_sitter_bash
from claude_agent_sdk import HookCallback, HookContext, HookInput, HookJSONOutput, HookMatcher
from claude_agent_sdk.types import HookEvent
from tree_sitter import Language, Node, Parser

from app.errors import ConfigError
from app.logger import get_logger

log = get_logger(__name__)

MAX_COMMAND_LENGTH = 100_000
MAX_NESTING = 4  # bash -c inside bash -c ... and backtick bodies, each re-parsed
MAX_WORKING_DIRECTORIES = 16  # candidate directories a command's `cd`s can leave it in
MAX_GLOB_MATCHES = 10_000

# --- tools -----------------------------------------------------------------------------------------

READ_TOOLS = frozenset({"Read", "Glob", "Grep", "LS"})
WRITE_TOOLS = frozenset({"Write", "Edit", "MultiEdit"})
PATHLESS_TOOLS = frozenset({"TodoWrite", "TaskCreate", "TaskUpdate", "TaskList", "TaskGet"})
DENIED_TOOLS = frozenset({"WebFetch", "WebSearch", "NotebookEdit", "Task", "Agent"})
_PATH_KEYS = ("file_path", "path", "notebook_path")

# --- commands --------------------------------------------------------------------------------------

ALWAYS_DENIED_COMMANDS = frozenset(
    {
        "curl", "wget", "ssh", "scp", "sftp", "rsync", "nc", "ncat", "netcat", "socat", "telnet", "ftp",
        "lftp", "tftp", "aria2c", "sudo", "su", "doas", "pkexec", "runuser", "docker", "podman",
        "kubectl", "nsenter", "chroot", "unshare", "mount", "umount", "gh", "busybox",
    }
)  # fmt: skip
ALWAYS_DENIED_GIT = frozenset({"push", "remote", "config", "credential"})
GIT_READ_SUBCOMMANDS = frozenset(
    {
        "status", "diff", "log", "show", "branch", "rev-parse", "ls-files", "ls-tree", "blame", "grep",
        "describe", "shortlog", "cat-file", "merge-base", "rev-list", "stash", "diff-tree",
        "diff-files", "diff-index", "name-rev", "for-each-ref", "show-ref", "whatchanged", "version",
    }
)  # fmt: skip
# Arguments are not paths: nothing is checked but the command name (and -v where it evaluates code).
_NO_PATH_COMMANDS = frozenset(
    {
        "echo", "printf", "pwd", "true", "false", ":", "sleep", "seq", "basename", "dirname",
        "expr", "which", "type", "uname", "whoami", "id", "printenv", "tr", "test", "[", "set", "exit",
        "wait", "read",
    }
)  # fmt: skip
# Every positional argument is a path that must resolve inside the worktree.
_READ_COMMANDS = frozenset(
    {
        "ls", "cat", "head", "tail", "wc", "cut", "diff", "file", "stat", "realpath", "readlink", "du",
        "nl", "rev", "comm", "join", "paste", "fold", "column", "od", "hexdump", "md5sum", "sha1sum",
        "sha256sum", "sha512sum", "cmp", "base64", "date",
    }
)  # fmt: skip
# Options of read commands whose value is a file they read: (short letters, long names).
_READ_FILE_OPTIONS: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "date": ("fr", ("--file", "--reference")),
    "file": ("fm", ("--files-from", "--magic-file")),
    "du": ("X", ("--exclude-from", "--files0-from")),
    "wc": ("", ("--files0-from",)),
    "diff": ("X", ("--exclude-from", "--from-file", "--to-file")),
    "hexdump": ("f", ()),
}
# Every positional argument and option value is a path the command may write.
_WRITE_COMMANDS = frozenset({"mkdir", "touch", "cp", "mv", "rm", "rmdir", "chmod", "ln", "tee"})
_DELETE_COMMANDS = frozenset({"rm", "rmdir"})
# Project toolchains: they run project code by design; only path-like arguments are checked.
_TOOLCHAINS = frozenset(
    {
        "node", "npm", "npx", "pnpm", "yarn", "corepack", "tsc", "eslint", "prettier", "jest", "vitest",
        "mocha", "ts-node", "tsx", "python", "python3", "pip", "pip3", "uv", "uvx", "poetry", "pipenv",
        "pytest", "ruff", "mypy", "black", "isort", "flake8", "pylint", "tox", "nox", "coverage",
        "make", "cmake", "cargo", "rustc", "rustfmt", "go", "gofmt", "javac", "java", "mvn", "gradle",
        "dotnet", "ruby", "bundle", "rake", "rspec", "php", "composer",
    }
)  # fmt: skip
_SPECIAL_COMMANDS = frozenset(
    {"cd", "git", "grep", "rg", "find", "sed", "awk", "jq", "sort", "uniq", "tree", "xxd", "xargs",
     "env", "timeout", "nice", "nohup", "time", "command", "exec", "source", "."}
)  # fmt: skip
DEFAULT_ALLOWED_COMMANDS = (
    _NO_PATH_COMMANDS | _READ_COMMANDS | _WRITE_COMMANDS | _TOOLCHAINS | _SPECIAL_COMMANDS
)
_SHELLS = frozenset({"bash", "sh", "zsh", "dash", "ksh"})
_FILE_PROGRAMS = frozenset({"grep", "rg", "sed", "awk", "jq", "sort", "uniq", "tree", "xxd"})
_SYSTEM_BIN_DIRS = ("/bin", "/usr/bin", "/usr/local/bin", "/sbin", "/usr/sbin")
_SCRIPT_SUFFIXES = (".py", ".js", ".mjs", ".cjs", ".ts", ".sh")

# Variables that change which program runs, what a shell does at start-up, or how a command reads its
# arguments (POSIXLY_CORRECT ends GNU options at the first operand; ripgrep reads options from a file).
_DENIED_ASSIGNMENTS = frozenset(
    {"PATH", "ENV", "SHELLOPTS", "BASHOPTS", "PS1", "PS2", "PS3", "PS4", "PROMPT_COMMAND",
     "CDPATH", "HOME", "SHELL", "PAGER", "EDITOR", "VISUAL", "GCONV_PATH", "GLOBIGNORE",
     "POSIXLY_CORRECT", "RIPGREP_CONFIG_PATH"}
)  # fmt: skip
_DENIED_ASSIGNMENT_PREFIXES = ("LD_", "DYLD_", "BASH_", "GIT_")
_XARGS_FLAGS = frozenset(
    {"-0", "--null", "-r", "--no-run-if-empty", "-t", "--verbose", "-p", "--interactive", "-x", "--exit",
     "-o", "--open-tty", "--show-limits"}
)  # fmt: skip
_XARGS_VALUED = frozenset(
    {"-a", "--arg-file", "-d", "--delimiter", "-E", "-I", "-L", "-n", "--max-args", "-P", "--max-procs", "-s",
     "--max-chars", "--process-slot-var"}
)  # fmt: skip
# Only an attached value: in `xargs --eof curl x` curl is the command.
_XARGS_OPTIONAL = frozenset({"-e", "--eof", "-i", "--replace", "-l", "--max-lines"})
# `set` and `bash -o` options that leave bash reading commands as the policy reads them: not -k (then
# `ls PATH=/x` sets PATH for ls) nor history expansion (-H, -o history: `!!` rewrites a line before parsing).
_SET_FLAGS = "abefhmnuvxBCEPT"
_SHELL_OPTION_NAMES = frozenset(
    {"allexport", "braceexpand", "errexit", "errtrace", "functrace", "hashall", "monitor", "noclobber",
     "noexec", "noglob", "notify", "nounset", "physical", "pipefail", "verbose", "xtrace"}
)  # fmt: skip
# find tests whose value may be an expansion (anywhere else in the expression it could be -exec).
_FIND_VALUED_TESTS = frozenset(
    {"-name", "-iname", "-path", "-ipath", "-wholename", "-iwholename", "-lname", "-ilname", "-regex",
     "-iregex", "-regextype", "-type", "-xtype", "-size", "-perm", "-user", "-group", "-uid", "-gid",
     "-anewer", "-cnewer", "-mtime", "-atime", "-ctime", "-mmin", "-amin", "-cmin", "-maxdepth",
     "-mindepth", "-links", "-inum", "-samefile", "-used", "-fstype", "-context", "-printf"}
)  # fmt: skip
_ENV_FLAGS = frozenset({"-i", "--ignore-environment", "-0", "--null", "-v", "--debug"})
_SED_LONG_FLAGS = frozenset(
    {"--quiet", "--silent", "--regexp-extended", "--separate", "--null-data", "--unbuffered", "--posix",
     "--debug", "--sandbox", "--follow-symlinks", "--zero-terminated", "--line-length"}
)  # fmt: skip
_GIT_BRANCH_LISTING = frozenset(
    {"-a", "--all", "-r", "--remotes", "-l", "--list", "-v", "-vv", "--verbose", "--show-current", "--color",
     "--no-color", "--column", "--no-column", "-i", "--ignore-case"}
)  # fmt: skip
_PNPM_COMMANDS = frozenset(
    {"install", "i", "add", "remove", "rm", "uninstall", "update", "up", "upgrade", "run", "test", "t",
     "start", "list", "ls", "why", "outdated", "audit", "build", "rebuild", "prune", "store", "fetch",
     "import", "link", "unlink", "init", "install-test", "it", "pack", "publish", "root", "bin", "config",
     "c", "help", "env", "setup", "create", "licenses", "patch", "patch-commit", "dedupe", "recursive", "m",
     "multi", "server", "doctor", "cat-file", "cat-index", "find-hash", "deploy", "approve-builds",
     "ignored-builds", "self-update"}
)  # fmt: skip
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Where writes need allow_ci_config_writes (matched case-insensitively on the worktree-relative path).
_CI_DIRECTORIES = (".github/workflows", ".github/actions", ".circleci", ".buildkite")
_CI_FILES = frozenset(
    {".gitlab-ci.yml", "jenkinsfile", "azure-pipelines.yml", "bitbucket-pipelines.yml", ".travis.yml",
     ".drone.yml", ".gitlab-ci.yaml", "azure-pipelines.yaml", ".travis.yaml", ".drone.yaml"}
)  # fmt: skip
_DEVICES_READ = frozenset({"/dev/null", "/dev/stdin"})
_DEVICES_WRITE = frozenset({"/dev/null", "/dev/stdout", "/dev/stderr"})


@dataclass(frozen=True)
class Decision:
    """The policy's answer; for a denial `reason` names the command or path and the rule."""

    allowed: bool
    reason: str


@dataclass(frozen=True)
class PolicyConfig:
    """What the policy needs to know: the worktree, the settings that widen it, and read-only sessions.

    `read_only` (a review session) also denies every write and everything that runs project code:
    toolchains, project scripts and `source`.
    """

    worktree: Path
    extra_allowed_commands: frozenset[str] = frozenset()
    allow_ci_config_writes: bool = False
    read_only: bool = False


def is_ci_config_path(relative: str) -> bool:
    """True when a worktree-relative path is CI configuration (also for re-checking a diff before commit)."""
    rel = PurePosixPath(relative.replace("\\", "/").lower()).as_posix().lstrip("/")
    if rel.startswith("./"):
        rel = rel[2:]
    if any(rel == d or rel.startswith(d + "/") for d in _CI_DIRECTORIES):
        return True
    return PurePosixPath(rel).name in _CI_FILES


class _Denied(Exception):
    """Raised inside a check; becomes a denying Decision."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _short(text: str, limit: int = 80) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- words -----------------------------------------------------------------------------------------

_Segment = tuple[str, bool] | None  # (text, quoted); None where an expansion sits


@dataclass(frozen=True)
class _Word:
    """One shell word after quote removal; `text` is None when it holds an expansion."""

    text: str | None
    prefix: str = ""  # the literal text before the first expansion
    glob: bool = False  # unquoted * ? [ (or an extglob)
    brace: bool = False  # unquoted {a,b} or {1..3}
    tilde: bool = False  # unquoted leading ~
    placeholder: bool = False  # find's {}: a file name stands here; `text` is the start path
    split: bool = False  # an unquoted expansion: bash may split it into several words

    @classmethod
    def literal(cls, text: str) -> _Word:
        return cls(text, text)

    @property
    def shown(self) -> str:
        return _short(self.text if self.text is not None else self.prefix + "$…")


_ANSI_SIMPLE = {"a": "\a", "b": "\b", "e": "\x1b", "E": "\x1b", "f": "\f", "n": "\n", "r": "\r",
                "t": "\t", "v": "\v", "\\": "\\", "'": "'", '"': '"', "?": "?"}  # fmt: skip


def _decode_ansi_c(body: str) -> str | None:
    """Decode the inside of $'...' as bash does; None for anything this decoder does not know."""
    out: list[str] = []
    i = 0
    while i < len(body):
        c = body[i]
        if c != "\\" or i + 1 >= len(body):
            out.append(c)
            i += 1
            continue
        e = body[i + 1]
        i += 2
        if e in _ANSI_SIMPLE:
            out.append(_ANSI_SIMPLE[e])
        elif e in "01234567":
            digits = e + "".join(itertools.takewhile(lambda ch: ch in "01234567", body[i : i + 2]))
            i += len(digits) - 1
            out.append(chr(int(digits, 8) & 0xFF))
        elif e in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[e]
            digits = "".join(
                itertools.takewhile(lambda ch: ch in "0123456789abcdefABCDEF", body[i : i + width])
            )
            if not digits:
                out.append("\\" + e)
                continue
            i += len(digits)
            out.append(chr(int(digits, 16)) if int(digits, 16) < 0x110000 else "\ufffd")
        elif e == "c" and i < len(body):
            out.append(chr(ord(body[i]) & 0x1F))
            i += 1
        else:
            out.append("\\" + e)
    text = "".join(out)
    return None if "\0" in text else text


def _unquote_word(raw: str) -> list[_Segment]:
    """Backslash escapes of an unquoted word; quote or expansion characters left in it mean 'unknown'."""
    out: list[_Segment] = []
    i = 0
    while i < len(raw):
        c = raw[i]
        if c == "\\":
            if i + 1 < len(raw):
                if raw[i + 1] != "\n":
                    out.append((raw[i + 1], True))
                i += 2
                continue
            out.append(("\\", True))
        elif c in "'\"`$":
            out.append(None)
        else:
            out.append((c, False))
        i += 1
    return out


def _unescape(raw: str, escapable: str) -> str:
    """Drop the backslash before each character of `escapable`; a backslash-newline there goes whole."""
    out: list[str] = []
    i = 0
    while i < len(raw):
        if raw[i] == "\\" and i + 1 < len(raw) and raw[i + 1] in escapable:
            if raw[i + 1] != "\n":
                out.append(raw[i + 1])
            i += 2
            continue
        out.append(raw[i])
        i += 1
    return "".join(out)


def _text(node: Node) -> str:
    return (node.text or b"").decode("utf-8", "replace")


def _segments(node: Node, out: list[_Segment]) -> None:
    kind = node.type
    if kind in ("word", "extglob_pattern"):
        out.extend(_unquote_word(_text(node)))
    elif kind == "number":
        out.append((_text(node), False))
    elif kind == "raw_string":
        out.append((_text(node)[1:-1], True))
    elif kind in ("string", "translated_string"):
        for child in node.children:
            if child.type == "string_content":
                out.append((_unescape(_text(child), '$`"\\\n'), True))
            elif child.type == "$":
                out.append(("$", True))
            elif child.type == '"':
                continue
            elif child.type == "string":
                _segments(child, out)
            else:
                out.append(None)
    elif kind == "ansi_c_string":
        decoded = _decode_ansi_c(_text(node)[2:-1])
        out.append((decoded, True) if decoded is not None else None)
    elif kind == "concatenation":
        children = node.children
        for index, child in enumerate(children):
            nxt = children[index + 1] if index + 1 < len(children) else None
            if child.type == "$" and nxt is not None and nxt.type == "string":
                continue  # $"..." (a translated string)
            if not child.is_named:
                out.extend((c, False) for c in _text(child))
            else:
                _segments(child, out)
    elif kind == "brace_expression":
        out.extend((c, False) for c in _text(node))
    else:
        out.append(None)


def _unquoted_expansion(node: Node) -> bool:
    if node.type in ("simple_expansion", "expansion", "command_substitution", "arithmetic_expansion"):
        return True
    if node.type == "word":
        return any(c in _text(node) for c in "$`")
    if node.type in ("string", "raw_string", "ansi_c_string", "translated_string", "process_substitution"):
        return False
    return any(_unquoted_expansion(c) for c in node.named_children)


def _word(node: Node) -> _Word:
    if node.type == "command_name" and node.named_children:
        node = node.named_children[0]
    if node.type == "process_substitution":  # the shell passes a /dev/fd path
        return _Word.literal("/dev/stdin" if _text(node).startswith("<") else "/dev/stdout")
    segments: list[_Segment] = []
    _segments(node, segments)
    known: list[tuple[str, bool]] = []
    dynamic = False
    for segment in segments:
        if segment is None:
            dynamic = True
            break
        known.append(segment)
    shape = "".join(text if not quoted else "\0" * len(text) for text, quoted in known)
    literal = "".join(text for text, _ in known)
    return _Word(
        text=None if dynamic else literal,
        prefix=literal,
        split=dynamic and _unquoted_expansion(node),
        glob=any(c in shape for c in "*?[") or "(" in shape,
        brace=re.search(r"\{[^{}]*(?:,|\.\.)[^{}]*\}", shape) is not None,
        tilde=shape.startswith("~"),
    )


# --- options --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Option:
    """One option as a getopt-style command reads it: `-x` or `--name`, and the value it takes."""

    name: str  # the full name of a long option, even when the command line abbreviates it
    value: _Word | None = None  # the attached or the next word; None for a flag or when nothing follows
    attached: str | None = None  # the value's text when the option's own word carried it (`--name=v`, `-xv`)

    @property
    def path(self) -> _Word:
        """The value as a path to check: '' (the current directory) when the command line ends first."""
        return self.value or _Word.literal("")


@dataclass(frozen=True)
class _Syntax:
    """How one command spells its options. Every long option it has is listed, so none passes unchecked."""

    long_flags: frozenset[str] = frozenset()  # no value, or only an attached `=value`
    long_valued: frozenset[str] = frozenset()  # `=value` or the next word
    long_paired: frozenset[str] = frozenset()  # the next two words (jq --arg NAME VALUE), the value last
    short_valued: str = ""  # the rest of the cluster, else the next word (getopt)
    short_optional: str = ""  # the rest of the cluster only
    short_next: str = ""  # the next word while the cluster goes on, or the digits after it (tree -Lo 2 x)
    abbreviations: bool = True  # GNU getopt_long: an unambiguous prefix names a long option (--outp)

    @property
    def long_names(self) -> frozenset[str]:
        return self.long_flags | self.long_valued | self.long_paired


def _long_option(written: str, known: Collection[str], *, abbreviations: bool = True) -> str | None:
    """The known long option `written` names: itself, or the only one it abbreviates; None otherwise."""
    if written in known:
        return written
    if not abbreviations or written == "--":
        return None
    matches = [name for name in known if name.startswith(written)]
    return matches[0] if len(matches) == 1 else None


def _parse_options(
    command: str, words: Sequence[_Word], syntax: _Syntax
) -> tuple[list[_Option], list[_Word]]:
    """Split a command's arguments as its option parser does: its options in order, and its operands.

    Options may follow operands (GNU permutation), and everything after `--` is an operand. An expansion
    is an operand when it cannot become an option, and denied otherwise. A long option is resolved to its
    full name (abbreviations expanded where the command accepts them); an unknown or ambiguous one is
    denied, because the policy cannot tell what it does.
    """
    options: list[_Option] = []
    operands: list[_Word] = []
    ended = False
    rest = iter(words)

    def take_value() -> _Word | None:  # the next word, as an option's value
        return _whole(next(rest, None), command)

    for word in rest:
        text = word.text
        if not ended and _may_be_option(word):
            raise _Denied(f"{command} {word.shown}: an expansion here could be an option; put it after --")
        if text is None or ended or not text.startswith("-") or text == "-":
            operands.append(word)
        elif text == "--":
            ended = True
        elif text.startswith("--"):
            written, eq, value = text.partition("=")
            name = _long_option(written, syntax.long_names, abbreviations=syntax.abbreviations)
            if name is None:
                raise _Denied(f"{command} {_short(written)}: unknown or ambiguous option")
            if eq:
                options.append(_Option(name, _Word.literal(value), value))
            elif name in syntax.long_paired:
                take_value()
                options.append(_Option(name, take_value()))
            else:
                options.append(_Option(name, take_value() if name in syntax.long_valued else None))
        else:
            options += _short_options(text[1:], syntax, take_value)
    return options, operands


def _short_options(letters: str, syntax: _Syntax, take_value: Callable[[], _Word | None]) -> list[_Option]:
    """The options of one cluster of short letters; valued ones may take the next words with `take_value`."""
    options: list[_Option] = []
    index = 0
    while index < len(letters):
        letter, attached = letters[index], letters[index + 1 :]
        index += 1
        if letter in syntax.short_next:
            digits = "".join(itertools.takewhile(lambda c: c in "0123456789", attached))
            index += len(digits)
            options.append(
                _Option("-" + letter, _Word.literal(digits) if digits else take_value(), digits or None)
            )
        elif attached and letter in syntax.short_valued + syntax.short_optional:
            options.append(_Option("-" + letter, _Word.literal(attached), attached))
            break
        elif letter in syntax.short_valued:
            options.append(_Option("-" + letter, take_value()))
            break
        else:
            options.append(_Option("-" + letter))
    return options


def _may_be_option(word: _Word) -> bool:
    """Whether an expansion could reach the command as an option: it may start with '-' or split in words."""
    return word.text is None and (word.split or not word.prefix or word.prefix.startswith("-"))


def _whole(word: _Word | None, command: str) -> _Word | None:
    """`word`, which the shell passes as one argument; an unquoted expansion that may split is denied."""
    if word is not None and word.split:
        raise _Denied(
            f"{command} {word.shown}: an unquoted expansion could split into more arguments; quote it"
        )
    return word


def _literal_argument(word: _Word, command: str) -> str:
    """The text of an argument the check must read to know what `command` does; an expansion is denied."""
    if word.text is None:
        raise _Denied(f"{command} with a non-literal argument {word.shown}")
    return word.text


def _skip_options(
    argv: Sequence[_Word],
    flags: Collection[str],
    valued: Collection[str],
    *,
    optional: Collection[str] = (),
    why: str = "option not allowed",
    hook: Callable[[str, _Word | None], int | None] | None = None,
) -> int:
    """Index of the first operand of a command whose options end at its first operand; others are denied.

    A `valued` option takes the next word, `=value` or (a two-letter one) an attached value; an
    `optional` one only an attached value. A long option may be abbreviated as GNU getopt_long allows
    (the allowed names must hold every option of the command that is a prefix of one of them). Any
    other option is denied with `why`. `hook(text, next_word)` sees each option, its long name spelled
    out, first and may answer how many words it takes.
    """
    command = argv[0].text or ""
    attachable = [o for o in (*valued, *optional) if len(o) == 2]
    long_names = [o for o in (*flags, *valued, *optional) if o.startswith("--")]
    i = 1
    while i < len(argv):
        text = _literal_argument(argv[i], command)
        if text == "--":
            return i + 1
        if not text.startswith("-") or text == "-":
            return i
        if text.startswith("--"):
            written, eq, value = text.partition("=")
            resolved = _long_option(written, long_names)
            if resolved is None:
                raise _Denied(f"{command} {text}: {why}")
            text = resolved + eq + value
        name = text.partition("=")[0] if text.startswith("--") else text
        width = hook(text, argv[i + 1] if i + 1 < len(argv) else None) if hook else None
        if width is None:
            if text in valued:
                _whole(argv[i + 1] if i + 1 < len(argv) else None, command)
                width = 2
            elif text in flags or name in {*valued, *optional} or text.startswith(tuple(attachable)):
                width = 1
            else:
                raise _Denied(f"{command} {text}: {why}")
        i += width
    return i


def _check_program(word: _Word, what: str, problem_of: Callable[[str], str | None]) -> None:
    """Deny `what` ("a sed script") given inline: filled in by find's {}, not a literal, or unsafe."""
    noun = what.partition(" ")[2]
    command = noun.partition(" ")[0]
    if word.placeholder:
        raise _Denied(f"find -exec {command} {{}}: file names would run as {what}")
    if word.text is None:
        raise _Denied(f"{noun} {word.shown} is not a literal")
    problem = problem_of(word.text)
    if problem:
        raise _Denied(f"{command} {_short(word.text)!r}: {problem}")


def _hide_marked(words: Iterable[_Word], marker: str) -> list[_Word]:
    """Words holding `marker` (which xargs -I or find -exec replaces) become unknown, keeping their prefix."""
    return [_Word(None, w.prefix) if w.text and marker in w.text else w for w in words]


# --- the options of the file programs --------------------------------------------------------------
# Every long option of each command (GNU coreutils 9, sed 4.9, grep 3, ripgrep 14, tree 2, jq 1.6-1.7),
# so that an abbreviation resolves as the command resolves it and an unknown option is denied.

_SORT_SYNTAX = _Syntax(
    long_flags=frozenset(
        {"--ignore-leading-blanks", "--dictionary-order", "--ignore-case", "--general-numeric-sort",
         "--ignore-nonprinting", "--month-sort", "--human-numeric-sort", "--numeric-sort", "--random-sort",
         "--reverse", "--version-sort", "--check", "--debug", "--merge", "--stable", "--unique",
         "--zero-terminated", "--help", "--version"}
    ),
    long_valued=frozenset(
        {"--random-source", "--sort", "--batch-size", "--compress-program", "--files0-from", "--key",
         "--output", "--buffer-size", "--field-separator", "--temporary-directory", "--parallel"}
    ),
    short_valued="koTtSy",
)  # fmt: skip
_SED_SYNTAX = _Syntax(
    long_flags=frozenset(
        {"--quiet", "--silent", "--debug", "--follow-symlinks", "--in-place", "--posix", "--regexp-extended",
         "--separate", "--sandbox", "--unbuffered", "--null-data", "--zero-terminated", "--binary", "--help",
         "--version"}
    ),
    long_valued=frozenset({"--expression", "--file", "--line-length"}),
    short_valued="efl",
    short_optional="i",
)  # fmt: skip
_GREP_SYNTAX = _Syntax(
    long_flags=frozenset(
        {"--extended-regexp", "--fixed-strings", "--fixed-regexp", "--basic-regexp", "--perl-regexp",
         "--ignore-case", "--no-ignore-case", "--word-regexp", "--line-regexp", "--null-data",
         "--no-messages", "--invert-match", "--version", "--help", "--byte-offset", "--line-number",
         "--line-buffered", "--with-filename", "--no-filename", "--only-matching", "--quiet", "--silent",
         "--text", "--recursive", "--dereference-recursive", "--files-without-match",
         "--files-with-matches", "--count", "--initial-tab", "--null", "--binary", "--unix-byte-offsets",
         "--no-group-separator", "--color", "--colour"}
    ),
    long_valued=frozenset(
        {"--regexp", "--file", "--max-count", "--label", "--binary-files", "--devices", "--directories",
         "--exclude", "--exclude-from", "--exclude-dir", "--include", "--before-context",
         "--after-context", "--context", "--group-separator"}
    ),
    short_valued="efABCmdD",
)  # fmt: skip
_RG_SYNTAX = _Syntax(
    long_flags=frozenset(
        {"--help", "--version", "--pcre2-version", "--line-buffered", "--no-line-buffered",
         "--block-buffered", "--no-block-buffered", "--ignore-case", "--case-sensitive", "--smart-case",
         "--column", "--no-column", "--count", "--count-matches", "--include-zero", "--no-include-zero",
         "--no-encoding", "--files-with-matches", "--files-without-match", "--with-filename",
         "--no-filename", "--one-file-system", "--no-one-file-system", "--fixed-strings",
         "--no-fixed-strings", "--follow", "--no-follow", "--glob-case-insensitive",
         "--no-glob-case-insensitive", "--heading", "--no-heading", "--hidden", "--no-hidden",
         "--auto-hybrid-regex", "--no-auto-hybrid-regex", "--ignore", "--no-ignore",
         "--ignore-file-case-insensitive", "--no-ignore-file-case-insensitive", "--ignore-exclude",
         "--no-ignore-exclude", "--ignore-global", "--no-ignore-global", "--ignore-parent",
         "--no-ignore-parent", "--ignore-vcs", "--no-ignore-vcs", "--require-git", "--no-require-git",
         "--ignore-dot", "--no-ignore-dot", "--ignore-files", "--no-ignore-files", "--json", "--no-json",
         "--line-number", "--no-line-number", "--crlf", "--no-crlf", "--null-data",
         "--max-columns-preview", "--no-max-columns-preview", "--messages", "--no-messages",
         "--ignore-messages", "--no-ignore-messages", "--mmap", "--no-mmap", "--multiline",
         "--no-multiline", "--multiline-dotall", "--no-multiline-dotall", "--only-matching", "--passthru",
         "--passthrough", "--pcre2", "--no-pcre2", "--pcre2-unicode", "--no-pcre2-unicode", "--no-pre",
         "--pretty", "--vimgrep", "--sort-files", "--no-sort-files", "--stats", "--no-stats", "--text",
         "--no-text", "--binary", "--no-binary", "--trim", "--no-trim", "--type-list", "--word-regexp",
         "--line-regexp", "--unicode", "--no-unicode", "--search-zip", "--no-search-zip", "--byte-offset",
         "--no-byte-offset", "--no-context-separator", "--debug", "--trace", "--files", "--invert-match",
         "--no-invert-match", "--no-config", "--null", "--quiet", "--unrestricted", "--stop-on-nonmatch"}
    ),
    long_valued=frozenset(
        {"--after-context", "--before-context", "--context", "--encoding", "--engine", "--file",
         "--generate", "--glob", "--iglob", "--max-depth", "--maxdepth", "--pre", "--pre-glob", "--regexp",
         "--replace", "--sort", "--sortr", "--threads", "--type", "--type-add", "--type-clear",
         "--type-not", "--color", "--colors", "--context-separator", "--field-context-separator",
         "--field-match-separator", "--hostname-bin", "--hyperlink-format", "--dfa-size-limit",
         "--ignore-file", "--max-columns", "--max-count", "--max-bytes", "--max-filesize",
         "--path-separator", "--regex-size-limit"}
    ),
    short_valued="efABCmdDgtTjMEr",
    abbreviations=False,
)  # fmt: skip
# tree parses its own arguments: long options whole, and a valued letter takes the next word while the
# rest of its cluster goes on (`-Lo 2 out`: level 2, output to out), or the digits right after it.
_TREE_SYNTAX = _Syntax(
    long_flags=frozenset(
        {"--help", "--version", "--inodes", "--device", "--noreport", "--nolinks", "--dirsfirst",
         "--filesfirst", "--si", "--du", "--prune", "--ignore-case", "--matchdirs", "--fromtabfile",
         "--fromfile", "--metafirst", "--gitignore", "--info", "--fflinks", "--hyperlink", "--opt-toggle",
         "--condense", "--acl", "--selinux"}
    ),
    long_valued=frozenset(
        {"--filelimit", "--charset", "--timefmt", "--sort", "--gitfile", "--infofile", "--hintro",
         "--houtro", "--scheme", "--authority", "--compress"}
    ),
    short_next="oLPIHT",
    abbreviations=False,
)  # fmt: skip
_JQ_SYNTAX = _Syntax(
    long_flags=frozenset(
        {"--seq", "--stream", "--stream-errors", "--slurp", "--raw-input", "--null-input",
         "--compact-output", "--tab", "--color-output", "--monochrome-output", "--ascii-output",
         "--unbuffered", "--sort-keys", "--raw-output", "--raw-output0", "--join-output", "--nul-output",
         "--exit-status", "--binary", "--args", "--jsonargs", "--from-file", "--debug-dump-disasm",
         "--debug-trace", "--help", "--version", "--build-configuration"}
    ),
    long_valued=frozenset({"--indent", "--library-path"}),
    long_paired=frozenset({"--arg", "--argjson", "--slurpfile", "--rawfile", "--argfile"}),
    short_valued="L",
    abbreviations=False,
)  # fmt: skip


# --- sed and awk programs --------------------------------------------------------------------------


def _sed_script_problem(script: str) -> str | None:
    """What makes a GNU sed script unsafe (e/w/r commands, the e and w flags), or None."""
    n = len(script)
    i = 0

    def skip_delimited(i: int, parts: int) -> int:
        if i >= n or script[i] in "\n\\":  # `s` or `y` at the end, or a delimiter sed refuses
            raise ValueError
        delimiter = script[i]
        i += 1
        for _ in range(parts):
            while i < n and script[i] != delimiter:
                i += 2 if script[i] == "\\" else 1
            if i >= n:
                raise ValueError
            i += 1
        return i

    def skip_address(i: int) -> int:
        if i < n and script[i].isdigit():
            while i < n and (script[i].isdigit() or script[i] == "~"):
                i += 1
        elif i < n and script[i] == "$":
            i += 1
        elif i < n and script[i] in "/\\":
            i = skip_delimited(i + 1 if script[i] == "\\" else i, 1)
            while i < n and script[i] in "IM":
                i += 1
        return i

    try:
        while i < n:
            if script[i] in " \t\n;":
                i += 1
                continue
            if script[i] == "#":
                while i < n and script[i] != "\n":
                    i += 1
                continue
            i = skip_address(i)
            if i < n and script[i] == ",":
                i += 1
                if i < n and script[i] in "+~":
                    i += 1
                i = skip_address(i)
            while i < n and script[i] in " \t":
                i += 1
            if i < n and script[i] == "!":
                i += 1
                while i < n and script[i] in " \t":
                    i += 1
            if i >= n:
                return None
            command = script[i]
            i += 1
            if command in "{}=dDgGhHnNpPxzFqQlL":
                while i < n and (script[i].isdigit() or script[i] in " \t"):
                    i += 1
            elif command in "aic":
                while i < n and script[i] != "\n":
                    i += 2 if script[i] == "\\" else 1
            elif command in ":btTv":
                while i < n and script[i] not in ";\n":
                    i += 1
            elif command == "y":
                i = skip_delimited(i, 2)
            elif command == "s":
                i = skip_delimited(i, 2)
                while i < n and script[i] not in ";\n}":
                    flag = script[i]
                    if flag == "e":
                        return "the s///e flag executes the pattern space as a command"
                    if flag in "wW":
                        return "the s///w flag writes a file"
                    if flag not in "gpiImM0123456789 \t":
                        return f"unknown s/// flag {flag!r}"
                    i += 1
            elif command == "e":
                return "the e command executes a command"
            elif command in "wWrR":
                return f"the {command} command reads or writes a file named in the script"
            else:
                return f"unknown sed command {command!r}"
    except ValueError:
        return "the sed script could not be parsed"
    return None


def _awk_program_problem(program: str) -> str | None:
    """What makes an awk program unsafe (running commands, pipes, output redirection), or None."""
    if re.search(r"\bsystem\s*\(", program):
        return "system() runs a command"
    if "getline" in program:
        return "getline can read from a command or file"
    if "|" in program.replace("||", ""):
        return "| pipes to or from a command"
    if re.search(r"\bprintf?\b[^;{}\n]*>", program):
        return "print > redirects output to a file"
    if "@" in program:
        return "@ directives load extensions"
    return None


# --- the Bash check --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Via:
    """How a command was reached: through which wrapper, and what it does to the arguments."""

    wrapper: str = ""
    stdin_args: bool = False  # xargs appends arguments the policy cannot see
    find_starts: tuple[str, ...] = ()  # find -exec: {} stands for paths under these
    in_find: bool = False

    def through(self, wrapper: str, **changes: Any) -> _Via:
        return dataclasses.replace(self, wrapper=wrapper, **changes)


_CONTAINERS = frozenset(
    {"program", "list", "pipeline", "subshell", "do_group", "if_statement", "elif_clause",
     "else_clause", "while_statement", "case_statement", "case_item", "negated_command",
     "variable_assignments", "array", "for_statement", "binary_expression", "unary_expression",
     "parenthesized_expression", "ternary_expression", "postfix_expression"}
)  # fmt: skip
_WORDISH = frozenset(
    {"word", "number", "string", "raw_string", "ansi_c_string", "translated_string", "concatenation",
     "string_content", "brace_expression", "variable_name", "special_variable_name", "heredoc_content",
     "regex", "extglob_pattern", "test_operator", "file_descriptor", "heredoc_start", "heredoc_end",
     "simple_expansion", "process_substitution", "command_name"}
)  # fmt: skip
_ARITHMETIC_OK = frozenset(
    {"number", "binary_expression", "unary_expression", "ternary_expression", "parenthesized_expression"}
)
_ARITHMETIC_TESTS = frozenset({"-eq", "-ne", "-lt", "-le", "-gt", "-ge"})
# tree-sitter-bash 0.25 crashes the process (SIGSEGV) on `{` before some code points past U+2FFFF
# (U+34000, U+E0100, U+F0100, ...), and a lone surrogate cannot be encoded: both are denied before parsing.
_UNPARSABLE = re.compile("[\ud800-\udfff\U00030000-\U0010ffff]")
_WRITE_REDIRECTS = frozenset({">", ">>", "&>", "&>>", ">|", ">&"})
_READ_REDIRECTS = frozenset({"<", "<&"})


class _BashCheck:
    """One pass over one bash source: raises _Denied at the first thing the policy does not allow."""

    def __init__(self, policy: AgentPolicy, bases: list[str], depth: int) -> None:
        self.policy = policy
        self.paths = policy.paths
        self.bases = bases  # every directory the shell may be in when a command runs
        self.depth = depth

    # -- entry

    def source(self, text: str) -> None:
        if self.depth > MAX_NESTING:
            raise _Denied(f"{_short(text)}: shell code nested more than {MAX_NESTING} levels deep")
        if re.search(r"[^\s\\]\\\n[^\s]", text):
            raise _Denied("a backslash-newline inside a word: bash joins the word, the policy cannot")
        if re.search(r"[\x00-\x08\x0b-\x1f\x7f]", text):
            raise _Denied("control characters in the command")
        if _UNPARSABLE.search(text):
            raise _Denied("characters beyond U+2FFFF or lone surrogates in the command")
        root = self.policy.parser().parse(text.encode()).root_node
        if _has_syntax_error(root):
            raise _Denied(f"could not parse {_short(text)!r}: only complete, valid bash is allowed")
        self._collect_cd(root)
        self._walk(root)

    def _nested(self, text: str) -> None:
        _BashCheck(self.policy, list(self.bases), self.depth + 1).source(text)

    # -- the tree

    def _walk(self, node: Node) -> None:
        kind = node.type
        if not node.is_named:
            if kind == "&":
                raise _Denied("background jobs (&) are not allowed; run the command in the foreground")
            return
        if kind in _CONTAINERS or kind in _WORDISH:
            if kind == "for_statement":
                if node.children and node.children[0].type == "select":
                    raise _Denied("select reads from the terminal; not allowed")
                variable = node.child_by_field_name("variable")
                if variable is not None:
                    self._check_variable_name(_text(variable))
            self._walk_children(node)
        elif kind == "compound_statement":
            if node.children and node.children[0].type == "((":
                self._arithmetic(node, "((...))")
            else:
                self._walk_children(node)
        elif kind == "command":
            self._command(node, [])
        elif kind == "redirected_statement":
            self._redirected(node)
        elif kind == "function_definition":
            raise _Denied("defining shell functions is not allowed (a function can shadow an allowed name)")
        elif kind == "variable_assignment":
            self._assignment(node)
        elif kind == "declaration_command":
            self._declaration(node)
        elif kind == "unset_command":
            self._unset(node)
        elif kind == "test_command":
            self._test(node)
        elif kind == "expansion":
            self._expansion(node)
        elif kind == "subscript":
            self._subscript(node)
        elif kind == "arithmetic_expansion":
            self._arithmetic(node, "$((...))")
        elif kind == "c_style_for_statement":
            raise _Denied("C-style for loops are not allowed (arithmetic on variables); use for x in ...")
        elif kind == "command_substitution":
            if node.children and node.children[0].type == "`":
                self._nested(_backtick_body(node))
            else:
                self._walk_children(node)
        elif kind in ("file_redirect", "heredoc_redirect", "herestring_redirect"):
            for extra in self._redirect(node):
                self._walk(extra)
        elif kind == "heredoc_body":
            self._walk_children(node)
        elif kind == "comment":
            return
        else:
            raise _Denied(f"unsupported shell syntax ({kind}) in {_short(_text(node))!r}")

    def _walk_children(self, node: Node) -> None:
        for child in node.children:
            self._walk(child)

    # -- statements

    def _redirected(self, node: Node) -> None:
        body = node.child_by_field_name("body") or node.named_children[0]
        extras: list[Node] = []
        for child in node.children:
            if child.id == body.id:
                continue
            if child.is_named:
                extras.extend(self._redirect(child))
            elif child.type == "&":
                raise _Denied("background jobs (&) are not allowed; run the command in the foreground")
        if body.type == "command":
            self._command(body, extras)
            return
        if extras:
            raise _Denied(f"words after a redirection of a compound command: {_short(_text(node))!r}")
        self._walk(body)

    def _redirect(self, node: Node) -> list[Node]:
        """Check one redirection; return the words tree-sitter hung on it that are really arguments."""
        extras: list[Node] = []
        if node.type == "herestring_redirect":
            self._walk_children(node)
            return extras
        if node.type == "heredoc_redirect":
            quoted = False
            for child in node.children:
                if child.type == "heredoc_start":
                    quoted = any(q in _text(child) for q in "'\"\\")
                elif child.type == "heredoc_body":
                    if not quoted and "`" in _text(child):
                        raise _Denied("backticks in a here-document are not allowed; use $(...)")
                    self._walk(child)
                elif child.type == "file_redirect":
                    extras.extend(self._redirect(child))
                elif child.type in ("word", "string", "raw_string", "concatenation", "number"):
                    extras.append(child)
                else:
                    self._walk(child)
            return extras
        operator, target, extras = _split_redirect(node)
        if target is None and operator in (">&-", "<&-"):  # closes a descriptor
            return extras
        if target is None:
            raise _Denied(f"a redirection without a target: {_short(_text(node))!r}")
        if target.type == "process_substitution":
            self._walk(target)
            return extras
        self._walk(target)
        word = _word(target)
        if operator in (">&", "<&") and word.text is not None and (word.text == "-" or word.text.isdigit()):
            return extras
        if operator in _WRITE_REDIRECTS:
            self.write_path(word, f"redirect {operator}")
        elif operator in _READ_REDIRECTS:
            self.read_path(word, f"redirect {operator}")
        else:
            raise _Denied(f"unsupported redirection {operator!r}")
        return extras

    def _assignment(self, node: Node) -> None:
        name = node.child_by_field_name("name") or node.named_children[0]
        if name.type == "subscript":
            self._subscript(name)
            name = name.named_children[0]
        self._check_variable_name(_text(name))
        for child in node.children[1:]:
            self._walk(child)

    def _check_variable_name(self, name: str) -> None:
        if not _IDENTIFIER.fullmatch(name):
            raise _Denied(f"variable name {_short(name)!r} is not a plain identifier")
        upper = name.upper()
        if upper in _DENIED_ASSIGNMENTS or upper.startswith(_DENIED_ASSIGNMENT_PREFIXES):
            raise _Denied(
                f"setting {name} is not allowed (it changes which programs or code run, or how they read "
                "their arguments)"
            )

    def _declaration(self, node: Node) -> None:
        keyword = node.children[0].type
        for child in node.named_children:
            if child.type == "variable_assignment":
                self._assignment(child)
                continue
            if child.type == "variable_name":
                self._check_variable_name(_text(child))
                continue
            text = _literal_argument(_word(child), keyword)
            if text.startswith(("-", "+")):
                if not set(text[1:]) <= set("xrpa"):
                    raise _Denied(f"{keyword} {text}: only -x, -r, -a and -p are allowed")
                continue
            self._check_variable_name(text)

    def _unset(self, node: Node) -> None:
        for child in node.named_children:
            if child.type == "variable_name":
                continue
            word = _word(child)
            if word.text in ("-v", "-f"):
                continue
            if word.text is None or not _IDENTIFIER.fullmatch(word.text):
                raise _Denied(f"unset {word.shown}: only plain variable names are allowed")

    def _test(self, node: Node) -> None:
        if node.children and node.children[0].type == "[":
            self._nested("test" + _text(node)[1:-1])  # the same words, checked as the test builtin
            return
        for child in _descendants(node):
            if child.type == "test_operator" and _text(child) in ("-v", "-R"):
                raise _Denied(f"test {_text(child)} is not allowed (it evaluates array subscripts)")
            if child.type == "binary_expression":
                operators = [c for c in child.children if c.type == "test_operator"]
                if operators and _text(operators[0]) in _ARITHMETIC_TESTS:
                    for operand in child.named_children:
                        if operand.type != "test_operator" and not _text(operand).lstrip("-").isdigit():
                            raise _Denied(
                                f"[[ {_short(_text(child))} ]]: arithmetic comparison of a variable "
                                "(bash evaluates its value as code); compare literal numbers or use = "
                            )
        self._walk_children(node)

    def _expansion(self, node: Node) -> None:
        children = node.children
        if len(children) > 1 and children[1].type == "!":
            raise _Denied(f"indirect expansion {_short(_text(node))} is not allowed")
        for index, child in enumerate(children):
            if child.type == "@":
                raise _Denied(f"the @ operator in {_short(_text(node))} is not allowed")
            if child.type == ":":
                following = children[index + 1] if index + 1 < len(children) else None
                if following is not None and following.is_named and following.type != "number":
                    raise _Denied(f"substring offsets other than numbers: {_short(_text(node))}")
            if child.type == "subscript":
                self._subscript(child)
            elif child.is_named:
                self._walk(child)

    def _subscript(self, node: Node) -> None:
        index = node.child_by_field_name("index")
        if index is None:
            named = node.named_children
            index = named[1] if len(named) > 1 else None
        if index is not None and not (index.type == "number" or _text(index) in ("@", "*")):
            raise _Denied(f"array index {_short(_text(node))}: only literal numbers, @ and * are allowed")

    def _arithmetic(self, node: Node, what: str) -> None:
        for child in _descendants(node):
            if child.is_named and child is not node and child.type not in _ARITHMETIC_OK:
                raise _Denied(
                    f"{what} with variables or command output is not allowed "
                    f"(bash evaluates their values as code): {_short(_text(node))}"
                )

    # -- commands

    def _command_parts(self, node: Node) -> tuple[list[Node], Node | None, list[Node], list[Node]]:
        assignments: list[Node] = []
        arguments: list[Node] = []
        redirects: list[Node] = []
        name = node.child_by_field_name("name")
        for child in node.children:
            if name is not None and child.id == name.id:
                continue
            if child.type == "variable_assignment":
                assignments.append(child)
            elif child.type in ("file_redirect", "heredoc_redirect", "herestring_redirect"):
                redirects.append(child)
            elif child.type == "&":
                raise _Denied("background jobs (&) are not allowed; run the command in the foreground")
            elif child.is_named and child.type != "comment":
                arguments.append(child)
        return assignments, name, arguments, redirects

    def _command(self, node: Node, extras: list[Node]) -> None:
        assignments, name, arguments, redirects = self._command_parts(node)
        for redirect in redirects:
            extras = [*extras, *self._redirect(redirect)]
        for assignment in assignments:
            self._assignment(assignment)
        if name is None:
            raise _Denied(f"empty command {_short(_text(node))!r}")
        for child in (name, *arguments, *extras):
            self._walk(child)
        argv = [_word(name), *(_word(a) for a in (*arguments, *extras))]
        self.argv(argv, _Via())

    def argv(self, argv: Sequence[_Word], via: _Via) -> None:
        """Check one simple command given as words; wrappers recurse with their inner command."""
        if not argv:
            return
        head = argv[0]
        if head.text is None:
            raise _Denied(f"command name {head.shown} is an expansion; only literal command names run")
        name = head.text
        if not name:
            raise _Denied("an empty command name")
        if head.glob or head.brace or head.tilde:
            raise _Denied(f"command name {head.shown} would be expanded by the shell")
        if "/" in name:
            self._path_command(argv, via)
            return
        if name in ALWAYS_DENIED_COMMANDS:
            raise _Denied(f"{name}: network, privilege and container tools are always denied")
        if name == "eval":
            raise _Denied("eval: running a string as shell code is always denied")
        if (via.stdin_args or via.in_find) and not self._takes_unseen_arguments(name, via):
            raise _Denied(
                f"{via.wrapper} {name}: arguments the policy cannot see could change what {name} does"
            )
        for word in argv[1:]:
            if word.glob:
                self._glob_matches(word, name)
        if name in _SHELLS:
            self._shell(argv, via)
            return
        handler = self._HANDLERS.get(name)
        if handler is not None:
            handler(self, argv, via)
        elif name in _NO_PATH_COMMANDS:
            self._no_path(argv)
        elif name in _READ_COMMANDS:
            self._option_files(argv)
            self.paths_in(argv[1:], via, write=False, name=name)
        elif name in _WRITE_COMMANDS:
            self._write_command(argv, via)
        elif name in _TOOLCHAINS or name in self.policy.extra_commands:
            self._runs_project_code(name)
            self._toolchain(argv, via)
        else:
            raise _Denied(
                f"{name}: not on the command allowlist (an operator can add it with AGENT_ALLOWED_COMMANDS)"
            )

    def _glob_matches(self, word: _Word, command: str) -> None:
        """The names an unquoted pattern expands to must stay in the worktree and cannot read as options."""
        for base in self.bases:
            for match in _glob_expansions(word, base, command):
                if match.startswith("-"):
                    raise _Denied(
                        f"{command} {word.shown}: the pattern matches {_short(match)}, an option to {command}"
                    )
                problem = self.paths.problem(base, match, write=False)
                if problem:
                    raise _Denied(f"{command} {word.shown}: {problem}")

    def _option_files(self, argv: Sequence[_Word]) -> None:
        """Read paths given as option values (`date -f/etc/passwd` prints each line in an error)."""
        name = argv[0].text or ""
        letters, long_names = _READ_FILE_OPTIONS.get(name, ("", ()))
        for word in argv[1:]:
            text = word.text or ""
            if text == "--":
                return
            written, eq, value = text.partition("=")
            if text.startswith("--") and eq and any(o.startswith(written) for o in long_names):
                self.read_path(_Word.literal(value), f"{name} {written}")  # abbreviations included
            elif text.startswith("-") and not text.startswith("--"):
                rest = text[1:]
                for index, letter in enumerate(rest):
                    if letter in letters and rest[index + 1 :]:
                        self.read_path(_Word.literal(rest[index + 1 :]), f"{name} -{letter}")

    def _takes_unseen_arguments(self, name: str, via: _Via) -> bool:
        """Whether `name` stays safe when xargs or find -exec fills in arguments the policy cannot see.

        Not wrappers, git, runners (npx, uv run, ...) or cd: an unseen argument could become the program
        they run or the subcommand. File commands are fine under find, whose {} are paths under its
        checked start paths, but not under xargs.
        """
        if name in _NO_PATH_COMMANDS or name in _SHELLS:
            return True
        if name in _TOOLCHAINS or name in self.policy.extra_commands:
            return name not in self._RUNNERS and name != "corepack"
        return via.in_find and (name in _READ_COMMANDS or name in _WRITE_COMMANDS or name in _FILE_PROGRAMS)

    def _runs_project_code(self, what: str) -> None:
        if self.policy.config.read_only:
            raise _Denied(f"{what}: runs project code, and this session is read-only")

    def _path_command(self, argv: Sequence[_Word], via: _Via) -> None:
        literal = argv[0].text or ""
        base = PurePosixPath(literal).name
        targets = [os.path.realpath(os.path.join(b, literal)) for b in self.bases]
        names = {base, *(PurePosixPath(t).name for t in targets)}
        denied = names & ALWAYS_DENIED_COMMANDS
        if denied:
            raise _Denied(
                f"{literal}: {min(denied)} is a network, privilege or container tool, always denied"
            )
        if all(self.paths.inside(t) for t in targets):
            self._runs_project_code(literal)
            self.paths_in(argv[1:], via, write=False, name=literal, only_pathlike=True)
            return  # a project script or binary
        lexical = [os.path.normpath(os.path.join(b, literal)) for b in self.bases]
        system = {os.path.realpath(d) for d in _SYSTEM_BIN_DIRS}
        in_worktree = all(self.paths.inside(p) for p in lexical)  # e.g. .venv/bin/python -> /usr/bin/python3
        in_system = all(os.path.realpath(os.path.dirname(p)) in system for p in lexical)
        if in_worktree or in_system:
            self.argv([_Word.literal(base), *argv[1:]], via)
            return
        raise _Denied(f"{literal}: runs a program outside the worktree and the system bin directories")

    def _no_path(self, argv: Sequence[_Word]) -> None:
        name = argv[0].text
        if name in ("printf", "test", "[") and any(w.text in ("-v", "-R") for w in argv[1:]):
            raise _Denied(f"{name} -v is not allowed (it assigns or evaluates array subscripts)")
        if name == "read":
            self._read_builtin(argv)
        elif name == "set":
            _set_builtin(argv)
        elif name in ("test", "["):
            _test_operands(argv[1:-1] if name == "[" and argv[-1].text == "]" else argv[1:])
        elif name == "printf" and len(argv) > 1:
            leading = argv[2] if argv[1].text == "--" and len(argv) > 2 else argv[1]
            if leading.text is None:
                raise _Denied("printf with a non-literal format could take options such as -v; not allowed")

    def _read_builtin(self, argv: Sequence[_Word]) -> None:
        i = 1
        while i < len(argv):
            text = _literal_argument(argv[i], "read")
            if text.startswith("-") and len(text) > 1:
                if text[-1] in "dptnNui" and len(text) == 2:
                    _whole(argv[i + 1] if i + 1 < len(argv) else None, "read")
                    i += 1
            elif not _IDENTIFIER.fullmatch(text):
                raise _Denied(f"read {_short(text)}: only plain variable names are allowed")
            else:
                self._check_variable_name(text)
            i += 1

    # -- path arguments

    def paths_in(
        self,
        words: Sequence[_Word],
        via: _Via,
        *,
        write: bool,
        name: str,
        only_pathlike: bool = False,
        delete_tree: bool = False,
    ) -> None:
        """Check a command's positional arguments and --opt=value values as paths.

        File commands (`only_pathlike` False) need every path visible: an expansion or arguments that
        xargs appends are denied. Toolchains and scripts (`only_pathlike`) get only their absolute,
        home and `..` arguments checked.
        """
        if via.stdin_args and not only_pathlike:
            raise _Denied(
                f"xargs {name}: xargs would pass paths the policy cannot check; use find -exec or -r"
            )
        options_done = False
        for word in words:
            text = word.text
            if text is None:
                if not only_pathlike:
                    raise _Denied(f"{name}: argument {word.shown} is not a literal path")
                if _pathlike(word.prefix) or word.tilde:
                    self._path(_Word(word.prefix, word.prefix, tilde=word.tilde), name, write=write)
                continue
            if not options_done and text == "--":
                options_done = True
                continue
            if not options_done and text.startswith("-") and len(text) > 1:
                _, eq, value = text.partition("=")
                if eq and text.startswith("--") and (write or _pathlike(value)):
                    self._path(_Word.literal(value), name, write=write)
                continue
            if text == "-" or (only_pathlike and not (_pathlike(text) or word.tilde)):
                continue
            self._path(word, name, write=write, delete_tree=delete_tree)

    def _operand_paths(self, words: Sequence[_Word], via: _Via, *, write: bool, name: str) -> None:
        """Check words a command's option parsing found to be operands: a leading '-' is part of a path."""
        self.paths_in([_as_positional(w) for w in words], via, write=write, name=name)

    def read_path(self, word: _Word, what: str) -> None:
        self._path(word, what, write=False)

    def write_path(self, word: _Word, what: str) -> None:
        self._path(word, what, write=True)

    def _path(
        self, word: _Word, what: str, *, write: bool, delete_tree: bool = False, devices: bool = True
    ) -> None:
        if word.text is None:
            raise _Denied(f"{what}: {word.shown} is not a literal path")
        text = word.text
        if devices and text in (_DEVICES_WRITE if write else _DEVICES_READ):
            return
        if write and self.policy.config.read_only:
            raise _Denied(f"{what}: {word.shown} would be written, and this session is read-only")
        if word.tilde:
            raise _Denied(f"{what}: {word.shown} is in a home directory, outside the worktree")
        if word.brace:
            raise _Denied(f"{what}: brace expansion in the path {word.shown} is not allowed")
        if word.glob:
            for part in PurePosixPath(text).parts:
                # bash matches a leading dot only when the pattern spells it (and 5.2+ never matches ..)
                if part.startswith(".") and any(c in part for c in "*?[") and fnmatch.fnmatchcase("..", part):
                    raise _Denied(f"{what}: the pattern {word.shown} can match '..'")
        for base in self.bases:
            candidates = [text]
            if word.glob:  # what the shell would expand it to, each match checked (a symlink among them)
                candidates += _glob_expansions(word, base, what)
            for candidate in candidates:
                problem = self.paths.problem(base, candidate, write=write, delete_tree=delete_tree)
                if problem:
                    raise _Denied(f"{what}: {problem}")

    # -- per-command rules

    def _write_command(self, argv: Sequence[_Word], via: _Via) -> None:
        name = argv[0].text or ""
        words: list[_Word] = []
        for word in argv[1:]:
            text = word.text or ""
            if name in ("cp", "mv", "ln") and text.startswith("-t") and len(text) > 2:
                words.append(_Word.literal(text[2:]))
            else:
                words.append(word)
        delete_tree = via.in_find and name in _DELETE_COMMANDS
        self.paths_in(words, via, write=True, name=name, delete_tree=delete_tree)

    def _cd(self, argv: Sequence[_Word], via: _Via) -> None:
        if via.wrapper:
            raise _Denied(f"cd through {via.wrapper} is not allowed; use a plain cd")
        self._cd_destinations(_cd_target(argv))

    def _cd_destinations(self, target: str) -> list[str]:
        """Where `cd target` lands from each working directory; _Denied when that is not allowed."""
        destinations = []
        for base in self.bases:
            problem = self.paths.problem(base, target, write=False)
            if problem:
                raise _Denied(f"cd: {problem}")
            destinations.append(os.path.realpath(os.path.join(base, target)))
        return destinations

    def _collect_cd(self, root: Node) -> None:
        """Every directory the commands may run in: the start and where each plain `cd` goes."""
        commands = [n for n in _descendants(root) if n.type == "command"]
        for node in commands:
            _, name, arguments, _ = self._command_parts(node)
            if name is None or _word(name).text != "cd":
                continue
            parent = node.parent
            extras: list[Node] = []
            if parent is not None and parent.type == "redirected_statement":
                for child in parent.children:
                    if child.type == "file_redirect":
                        extras += _split_redirect(child)[2]
            target = _cd_target([_word(name), *(_word(a) for a in (*arguments, *extras))])
            for directory in self._cd_destinations(target):
                if directory not in self.bases:
                    self.bases.append(directory)
            if len(self.bases) > MAX_WORKING_DIRECTORIES:
                raise _Denied("too many cd commands in one command line")

    def _source(self, argv: Sequence[_Word], via: _Via) -> None:
        if len(argv) < 2:
            raise _Denied(f"{argv[0].text} without a file")
        self._runs_project_code(argv[0].text or "source")
        self._path(argv[1], f"{argv[0].text} (runs a file as shell code)", write=False, devices=False)
        self.paths_in(argv[2:], via, write=False, name=argv[0].text or "source", only_pathlike=True)

    def _shell(self, argv: Sequence[_Word], via: _Via) -> None:
        name = argv[0].text or "sh"
        i = 1
        command_mode = False
        while i < len(argv):
            text = argv[i].text
            if text is None:
                if command_mode:
                    break
                raise _Denied(f"{name} with a non-literal argument {argv[i].shown}")
            if text == "--":
                i += 1
                break
            if text in ("-o", "+o"):
                if i + 1 < len(argv):
                    _check_shell_option(_literal_argument(argv[i + 1], name), name)
                i += 2
                continue
            if text.startswith("--"):
                if text not in ("--norc", "--noprofile", "--posix"):
                    raise _Denied(f"{name} {text}: option not allowed")
            elif text.startswith(("-", "+")) and len(text) > 1:
                for flag in text[1:]:
                    if flag == "c":
                        command_mode = True
                    elif flag not in "euxvlnf":
                        raise _Denied(f"{name} -{flag}: option not allowed")
            else:
                break
            i += 1
        if command_mode:
            if i >= len(argv):
                raise _Denied(f"{name} -c without a command string")
            script = argv[i]
            if script.placeholder:
                raise _Denied(f"find -exec {name} -c {{}}: file names would run as shell code")
            if script.text is None:
                raise _Denied(f"{name} -c {script.shown}: the command string is not a literal")
            self._nested(script.text)
            return
        if i >= len(argv):
            raise _Denied(f"{name} reading commands from stdin cannot be checked; use {name} -c '...'")
        self._runs_project_code(f"{name} {argv[i].shown}")
        self._path(argv[i], f"{name} (runs a script)", write=False, devices=False)
        self.paths_in(argv[i + 1 :], via, write=False, name=name, only_pathlike=True)

    def _env(self, argv: Sequence[_Word], via: _Via) -> None:
        i = _skip_options(argv, _ENV_FLAGS, {"-u", "--unset"})
        if i < len(argv) and argv[i].text == "-":  # like -i
            i += 1
        while i < len(argv) and "=" in (assignment := _literal_argument(argv[i], "env")):
            self._check_variable_name(assignment.split("=", 1)[0])
            i += 1
        self.argv(argv[i:], via.through("env"))

    def _timeout(self, argv: Sequence[_Word], via: _Via) -> None:
        i = _skip_options(
            argv,
            {"--preserve-status", "--foreground", "-v", "--verbose"},
            {"-s", "-k", "--signal", "--kill-after"},
        )
        self.argv(argv[i + 1 :], via.through("timeout"))

    def _nice(self, argv: Sequence[_Word], via: _Via) -> None:
        words = [w for w in argv if not (w.text and re.fullmatch(r"-\d+", w.text))]
        i = _skip_options(words, (), {"-n", "--adjustment"})
        self.argv(words[i:], via.through("nice"))

    def _nohup(self, argv: Sequence[_Word], via: _Via) -> None:
        self.argv(argv[1:], via.through("nohup"))

    def _time(self, argv: Sequence[_Word], via: _Via) -> None:
        i = _skip_options(argv, {"-p"}, ())
        self.argv(argv[i:], via.through("time"))

    def _command_builtin(self, argv: Sequence[_Word], via: _Via) -> None:
        flags = [w.text for w in argv[1:] if w.text and w.text.startswith("-")]
        if any(f in ("-v", "-V") for f in flags):
            return  # only describes the name
        i = _skip_options(argv, {"-p"}, ())
        self.argv(argv[i:], via.through("command"))

    def _exec(self, argv: Sequence[_Word], via: _Via) -> None:
        i = _skip_options(argv, {"-c", "-l"}, {"-a"})
        if i >= len(argv):
            raise _Denied("exec without a command changes the shell's redirections; not allowed")
        self.argv(argv[i:], via.through("exec"))

    def _xargs(self, argv: Sequence[_Word], via: _Via) -> None:
        replace: str | None = None

        def replace_string_and_arg_file(text: str, following: _Word | None) -> int | None:
            nonlocal replace
            if text == "-I":
                replace = following.text if following else None
                if replace is None:
                    raise _Denied("xargs -I without a literal replace string")
                return 2
            if text.startswith(("-I", "-i", "--replace")):
                replace = text[2:] if text.startswith(("-I", "-i")) else text.partition("=")[2]
                replace = replace or "{}"
                return 1
            if text.startswith(("-a", "--arg-file")):
                attached = text.partition("=")[2] if text.startswith("--") else text[2:]
                value = attached or (following.text if following else None)
                self.read_path(_Word(value, value or ""), "xargs -a")
            return None

        i = _skip_options(
            argv, _XARGS_FLAGS, _XARGS_VALUED, optional=_XARGS_OPTIONAL, hook=replace_string_and_arg_file
        )
        inner = list(argv[i:]) or [_Word.literal("echo")]
        if replace:
            inner = _hide_marked(inner, replace)
        self.argv(inner, via.through("xargs", stdin_args=True))

    def _find(self, argv: Sequence[_Word], via: _Via) -> None:
        if via.stdin_args:
            raise _Denied("xargs find: xargs would pass paths the policy cannot check")
        i = 1
        while i < len(argv) and (argv[i].text or "x")[:2] in ("-H", "-P", "-L", "-D", "-O"):
            if argv[i].text == "-L":
                raise _Denied("find -L follows symlinks out of the worktree; not allowed")
            i += 2 if argv[i].text == "-D" else 1
        starts: list[_Word] = []
        while i < len(argv):
            text = argv[i].text
            if text is not None and (text.startswith("-") or text in ("(", ")", "!", ",")):
                break
            starts.append(argv[i])
            i += 1
        starts = starts or [_Word.literal(".")]
        for start_word in starts:
            self.read_path(start_word, "find")
        start_texts = tuple(w.text or "." for w in starts)
        while i < len(argv):
            text = argv[i].text
            previous = argv[i - 1].text or ""
            if text is None and (
                argv[i].split or not (previous in _FIND_VALUED_TESTS or previous.startswith("-newer"))
            ):
                raise _Denied(
                    f"find {argv[i].shown}: an expansion where find reads its expression could be an action "
                    "such as -exec or -delete"
                )
            if text == "-follow":
                raise _Denied("find -follow follows symlinks out of the worktree; not allowed")
            if text in ("-execdir", "-okdir"):
                raise _Denied(
                    f"find {text} runs commands in directories the policy cannot predict; use -exec"
                )
            if text in ("-exec", "-ok"):
                end = i + 1
                while end < len(argv) and not (
                    argv[end].text == ";" or (argv[end].text == "+" and argv[end - 1].text == "{}")
                ):
                    end += 1
                if end >= len(argv):
                    raise _Denied(f"find {text} without a terminating ';' or '+'")
                for word in argv[i + 1 : end]:  # a split word could end the command early with a ';'
                    _whole(word, f"find {text}")
                self._find_exec(argv[i + 1 : end], start_texts, via)
                i = end + 1
                continue
            if text == "-files0-from":
                raise _Denied("find -files0-from reads its start paths from a file the policy cannot check")
            if text == "-delete":
                for start in start_texts:
                    self._path(_Word.literal(start), "find -delete", write=True, delete_tree=True)
            if text in ("-fprint", "-fprint0", "-fls", "-fprintf") and i + 1 < len(argv):
                self.write_path(argv[i + 1], f"find {text}")
                i += 2 if text == "-fprintf" else 1  # and -fprintf's format
            i += 1

    def _find_exec(self, inner: Sequence[_Word], starts: tuple[str, ...], via: _Via) -> None:
        if not inner:
            raise _Denied("find -exec without a command")
        if any(w.text == "{}" for w in inner):
            for start in starts:
                replaced = [_Word(start, start, placeholder=True) if w.text == "{}" else w for w in inner]
                self.argv(_hide_marked(replaced, "{}"), via.through("find -exec", in_find=True))
        else:
            self.argv(_hide_marked(inner, "{}"), via.through("find -exec"))

    def _grep(self, argv: Sequence[_Word], via: _Via) -> None:
        name = argv[0].text or "grep"
        ripgrep = name == "rg"
        options, operands = _parse_options(name, argv[1:], _RG_SYNTAX if ripgrep else _GREP_SYNTAX)
        pattern_given = False
        for option in options:
            if ripgrep and option.name in ("--pre", "--pre-glob", "--hostname-bin"):
                raise _Denied(f"rg {option.name} runs a command; not allowed")
            if option.name in ("-e", "-f", "--regexp", "--file", "--files"):  # rg --files: no pattern
                pattern_given = True
            if option.name in ("-f", "--file", "--exclude-from", "--ignore-file"):
                self.read_path(option.path, f"{name} {option.name}")
            elif option.name.startswith("--") and option.attached and _pathlike(option.attached):
                self.read_path(option.path, name)
        if not pattern_given and operands:
            operands = operands[1:]
        self._operand_paths(operands, via, write=False, name=name)

    def _sed(self, argv: Sequence[_Word], via: _Via) -> None:
        options, operands = _parse_options("sed", argv[1:], _SED_SYNTAX)
        scripts: list[_Word] = []
        in_place = False
        for option in options:
            if option.name in ("-e", "--expression"):
                if option.value is not None:
                    scripts.append(option.value)
            elif option.name in ("-i", "--in-place"):
                in_place = True
                if "/" in (option.attached or ""):
                    raise _Denied(f"sed {option.name} with a backup suffix containing '/' is not allowed")
            elif option.name == "-f":
                raise _Denied("sed -f: scripts from files are not inspected; pass the script inline")
            elif option.name.startswith("--"):
                if option.name not in _SED_LONG_FLAGS:
                    raise _Denied(f"sed {option.name}: option not allowed")
            elif option.name[1] not in "nErsuzl":
                raise _Denied(f"sed {option.name}: option not allowed")
        if not scripts and operands:
            scripts, operands = [operands[0]], operands[1:]
        for script in scripts:
            _check_program(script, "a sed script", _sed_script_problem)
        self._operand_paths(operands, via, write=in_place, name="sed -i" if in_place else "sed")

    def _awk(self, argv: Sequence[_Word], via: _Via) -> None:
        why = "option not allowed (program files and extensions are not inspected)"
        i = _skip_options(argv, (), {"-F", "-v"}, why=why)
        if i >= len(argv):
            return
        _check_program(argv[i], "an awk program", _awk_program_problem)
        files = [w for w in argv[i + 1 :] if not (w.text and re.fullmatch(r"[A-Za-z_]\w*=.*", w.text, re.S))]
        self._operand_paths(files, via, write=False, name="awk")

    def _jq(self, argv: Sequence[_Word], via: _Via) -> None:
        options, operands = _parse_options("jq", argv[1:], _JQ_SYNTAX)
        for option in options:
            if option.name in ("-f", "--from-file", "-L", "--library-path"):
                raise _Denied(f"jq {option.name}: filters from files and module paths are not inspected")
            if option.name in ("--slurpfile", "--rawfile", "--argfile"):
                self.read_path(option.path, f"jq {option.name}")
        if operands:  # the filter; the rest are input files (or, after --args, strings checked as files)
            program = operands.pop(0)
            if program.text is None or program.placeholder:
                raise _Denied(f"jq filter {program.shown} is not a literal")
            if re.search(r"\b(import|include)\b", program.text):
                raise _Denied("jq import/include loads files the policy cannot see")
        self._operand_paths(operands, via, write=False, name="jq")

    def _sort(self, argv: Sequence[_Word], via: _Via) -> None:
        options, operands = _parse_options("sort", argv[1:], _SORT_SYNTAX)
        for option in options:
            if option.name == "--compress-program":
                raise _Denied("sort --compress-program runs a command; not allowed")
            if option.name == "--files0-from":
                raise _Denied("sort --files0-from reads the files to sort from a list; name them instead")
            if option.name in ("-o", "-T", "--output", "--temporary-directory"):
                self.write_path(option.path, f"sort {option.name}")
            elif option.name == "--random-source":
                self.read_path(option.path, "sort --random-source")
        self._operand_paths(operands, via, write=False, name="sort")

    def _uniq(self, argv: Sequence[_Word], via: _Via) -> None:
        self.paths_in(argv[1:], via, write=True, name=argv[0].text or "uniq")

    def _tree(self, argv: Sequence[_Word], via: _Via) -> None:
        options, operands = _parse_options("tree", argv[1:], _TREE_SYNTAX)
        for option in options:
            if option.name == "-R":
                raise _Denied("tree -R writes a 00Tree.html into every directory past the -L level")
            if option.name == "-o":
                self.write_path(option.path, "tree -o")
            elif option.name in ("--gitfile", "--infofile", "--hintro", "--houtro"):
                self.read_path(option.path, f"tree {option.name}")
        self._operand_paths(operands, via, write=False, name="tree")

    def _git(self, argv: Sequence[_Word], via: _Via) -> None:
        i = 1
        while i < len(argv):
            text = _literal_argument(argv[i], "git")
            if text == "-c" or text.startswith(("-c", "--config-env")):
                raise _Denied("git -c: setting git configuration on the command line is always denied")
            if text.startswith("--exec-path"):
                raise _Denied("git --exec-path is not allowed")
            if text in ("-C",):
                if i + 1 >= len(argv):
                    raise _Denied("git -C without a directory")
                self.read_path(argv[i + 1], "git -C")
                i += 2
                continue
            if text in ("--no-pager", "-P", "--no-replace-objects", "--literal-pathspecs", "--glob-pathspecs",
                        "--noglob-pathspecs", "--icase-pathspecs", "--no-optional-locks"):  # fmt: skip
                i += 1
                continue
            if text in ("--version", "--help", "-h", "-v"):
                return
            if text.startswith("-"):
                raise _Denied(f"git {text}: option not allowed")
            break
        if i >= len(argv):
            return
        sub = argv[i].text or ""
        if sub in ALWAYS_DENIED_GIT:
            raise _Denied(f"git {sub}: always denied (the service pushes, and git configuration is fixed)")
        if sub not in GIT_READ_SUBCOMMANDS:
            raise _Denied(
                f"git {sub}: not allowed; only read-only git commands run (the service commits and pushes)"
            )
        rest = list(argv[i + 1 :])
        texts = [w.text or "" for w in rest]
        options_end = texts.index("--") if "--" in texts else len(rest)
        expansion = next((w for w in rest[:options_end] if _may_be_option(w)), None)
        if expansion is not None:
            raise _Denied(
                f"git {sub} {expansion.shown}: an expansion here could be an option; write it out, or "
                "put paths after --"
            )
        if sub == "branch":
            self._git_branch(texts)
        if sub == "stash" and (not texts or texts[0] not in ("list", "show")):
            raise _Denied("git stash: only git stash list and git stash show are allowed")
        if sub == "grep" and any(_opens_pager(t) for t in texts):
            raise _Denied("git grep -O runs a pager command; not allowed")
        checked: list[_Word] = []
        index = 0
        while index < len(rest):  # diff options are never abbreviated: git keeps unknown ones for later
            text = texts[index]
            if text == "--output" and index + 1 < len(rest):
                self.write_path(rest[index + 1], f"git {sub} --output")
                index += 2
                continue
            if text.startswith("--output="):
                self.write_path(_Word.literal(text.partition("=")[2]), f"git {sub} --output")
            else:
                checked.append(rest[index])
            index += 1
        self.paths_in(checked, via, write=False, name=f"git {sub}", only_pathlike=True)

    @staticmethod
    def _git_branch(texts: list[str]) -> None:
        listing = _GIT_BRANCH_LISTING
        with_commit = {"--contains", "--no-contains", "--merged", "--no-merged", "--points-at"}
        list_mode = any(t in ("-l", "--list") for t in texts)
        previous = ""
        for text in texts:
            option = text.split("=", 1)[0]
            if text.startswith("-"):
                if text not in listing and option not in with_commit | {
                    "--sort",
                    "--format",
                    "--color",
                    "--column",
                }:
                    raise _Denied(f"git branch {text}: only listing branches is allowed")
            elif not list_mode and previous not in with_commit:
                raise _Denied(f"git branch {text}: creating branches is not allowed (the service does it)")
            previous = text

    # toolchains that run other programs: (subcommands that start a program, allowed flags, valued options)
    _RUNNERS: Mapping[str, tuple[frozenset[str], frozenset[str], frozenset[str]]] = {
        "npx": (frozenset({""}), frozenset({"-y", "--yes", "--no", "-q", "--quiet", "--no-install"}),
                frozenset({"-p", "--package"})),
        "npm": (frozenset({"exec", "x"}), frozenset({"-y", "--yes", "--no", "-q", "--quiet"}),
                frozenset({"-p", "--package", "-w", "--workspace"})),
        "pnpm": (frozenset({"exec", "dlx"}), frozenset({"-r", "--recursive", "--parallel", "--silent", "-s"}),
                 frozenset({"--filter", "-F", "-C", "--dir", "--package"})),
        "yarn": (frozenset({"exec", "dlx"}), frozenset({"-q", "--quiet"}), frozenset({"-p", "--package"})),
        "uv": (frozenset({"run"}), frozenset({"--frozen", "--locked", "--no-sync", "--offline", "--isolated",
                                              "--all-extras", "--no-dev", "--dev", "-q", "--quiet", "-v",
                                              "--verbose", "--no-project", "--active", "--exact", "-m",
                                              "--module", "--all-packages", "--no-config"}),
               frozenset({"--with", "--with-editable", "--with-requirements", "--python", "-p", "--project",
                          "--directory", "--package", "--extra", "--group", "--only-group", "--env-file",
                          "--index", "--index-url", "--extra-index-url", "--from"})),
        "uvx": (frozenset({""}), frozenset({"-q", "--quiet", "--offline", "--isolated"}),
                frozenset({"--from", "--with", "--python", "-p", "--with-editable", "--with-requirements",
                           "--index", "--index-url", "--extra-index-url"})),
        "poetry": (frozenset({"run"}), frozenset({"-q", "--quiet", "-v", "-n", "--no-interaction"}),
                   frozenset({"-C", "--directory", "-P", "--project"})),
        "pipenv": (frozenset({"run"}), frozenset(), frozenset()),
        "bundle": (frozenset({"exec"}), frozenset({"--keep-file-descriptors"}), frozenset({"--gemfile"})),
    }  # fmt: skip

    def _toolchain(self, argv: Sequence[_Word], via: _Via) -> None:
        name = argv[0].text or ""
        if name == "corepack":
            if len(argv) > 1 and argv[1].text in ("npm", "pnpm", "yarn", "npx", "pnpx"):
                self.argv(argv[1:], via.through("corepack"))
                return
            raise _Denied("corepack: only corepack npm|pnpm|yarn ... is allowed")
        runner = self._RUNNERS.get(name)
        if runner is not None:
            self._runner(argv, via, *runner)
            return
        self.paths_in(argv[1:], via, write=False, name=name, only_pathlike=True)

    def _runner(
        self,
        argv: Sequence[_Word],
        via: _Via,
        subcommands: frozenset[str],
        flags: frozenset[str],
        valued: frozenset[str],
    ) -> None:
        name = argv[0].text or ""
        texts = [w.text for w in argv]
        start: int | None = 1 if "" in subcommands else None
        if start is None:
            for index, word in enumerate(argv[1:], start=1):
                text = _literal_argument(word, name)
                if text in subcommands or (
                    name == "uv" and text == "tool" and texts[index + 1 :][:1] == ["run"]
                ):
                    start = index + (2 if text == "tool" else 1)
                    break
        if start is None:
            if name == "pnpm":
                self._pnpm_fallback(argv, via)
            self.paths_in(argv[1:], via, write=False, name=name, only_pathlike=True)
            return
        i = start
        while i < len(argv):
            text = _literal_argument(argv[i], name)
            if text == "--":
                i += 1
                break
            if not text.startswith("-"):
                break
            option = text.split("=", 1)[0]
            if text in flags:
                i += 1
            elif text in valued:
                _whole(argv[i + 1] if i + 1 < len(argv) else None, name)
                i += 2
            elif option in valued:
                i += 1
            else:
                raise _Denied(f"{name} {text}: option not allowed before the program it runs")
        inner = list(argv[i:])
        if not inner:
            return
        program = inner[0].text or ""
        if program.endswith(_SCRIPT_SUFFIXES) and "/" not in program:
            inner[0] = _Word.literal("./" + program)
        elif program.startswith("@") or "@" in program[1:]:
            bare = (
                program.rsplit("/", 1)[-1].split("@", 1)[0]
                if program.startswith("@")
                else program.split("@")[0]
            )
            inner[0] = _Word.literal(bare)
        self.argv(inner, via.through(name))

    def _pnpm_fallback(self, argv: Sequence[_Word], via: _Via) -> None:
        """`pnpm NAME` runs a package.json script, a pnpm command, or else NAME itself."""
        first = next((w for w in argv[1:] if w.text and not w.text.startswith("-")), None)
        if first is None or first.text in _PNPM_COMMANDS:
            return
        if first.text in self._package_scripts():
            return
        index = list(argv).index(first)
        self.argv(argv[index:], via.through("pnpm"))

    def _package_scripts(self) -> set[str]:
        scripts: set[str] = set()
        for base in self.bases:
            try:
                data = json.loads(Path(base, "package.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and isinstance(data.get("scripts"), dict):
                scripts |= set(data["scripts"])
        return scripts

    _HANDLERS: Mapping[str, Callable[[_BashCheck, Sequence[_Word], _Via], None]] = {
        "cd": _cd,
        "git": _git,
        "grep": _grep,
        "rg": _grep,
        "find": _find,
        "sed": _sed,
        "awk": _awk,
        "jq": _jq,
        "sort": _sort,
        "uniq": _uniq,
        "xxd": _uniq,
        "tree": _tree,
        "xargs": _xargs,
        "env": _env,
        "timeout": _timeout,
        "nice": _nice,
        "nohup": _nohup,
        "time": _time,
        "command": _command_builtin,
        "exec": _exec,
        "source": _source,
        ".": _source,
    }


_TEST_UNARY = frozenset(
    {"-a", "-b", "-c", "-d", "-e", "-f", "-g", "-h", "-k", "-p", "-r", "-s", "-t", "-u", "-w", "-x", "-G",
     "-L", "-N", "-O", "-S", "-z", "-n", "-o", "!"}
)  # fmt: skip
_TEST_BINARY = frozenset(
    {"=", "==", "!=", "<", ">", "-eq", "-ne", "-lt", "-le", "-gt", "-ge", "-nt", "-ot", "-ef", "-a", "-o"}
)


def _set_builtin(argv: Sequence[_Word]) -> None:
    """`set` may turn on only the flags and -o options that keep bash reading commands as written."""
    i = 1
    while i < len(argv):
        text = _literal_argument(argv[i], "set")
        i += 1
        if text in ("-", "--") or text[:1] not in ("-", "+"):
            return  # the rest are positional parameters
        for letter in text[1:]:
            if letter == "o":
                if i < len(argv):  # `set -o` alone lists the options
                    _check_shell_option(_literal_argument(argv[i], "set"), "set")
                i += 1
            elif letter not in _SET_FLAGS:
                raise _Denied(
                    f"set -{letter}: not allowed (it could change how bash reads the commands that follow)"
                )


def _check_shell_option(option: str, command: str) -> None:
    if option not in _SHELL_OPTION_NAMES:
        raise _Denied(f"{command} -o {option}: not allowed (it could change how bash reads commands)")


def _test_operands(args: Sequence[_Word]) -> None:
    """Expansions in `test`/`[` must sit where bash reads an operand, never where it reads an operator."""
    if all(w.text is not None for w in args):
        return
    if any(w.split for w in args):
        raise _Denied("test with an unquoted expansion: bash may split it into operators such as -v")
    texts = [w.text for w in args]
    if len(args) == 1 or (len(args) == 2 and texts[0] is not None):
        return
    if len(args) == 3 and texts[1] in _TEST_BINARY:
        return
    for index, text in enumerate(texts):
        if text is None and (index == 0 or texts[index - 1] not in _TEST_UNARY | _TEST_BINARY):
            raise _Denied("test with an expansion where bash could read an operator such as -v")


def _split_redirect(node: Node) -> tuple[str, Node | None, list[Node]]:
    """A file redirection's operator, its target, and the words after it (which are arguments)."""
    operator = ""
    target: Node | None = None
    extras: list[Node] = []
    for child in node.children:
        if not child.is_named:
            operator = operator or child.type
        elif child.type == "file_descriptor" and target is None:
            continue
        elif target is None:
            target = child
        else:
            extras.append(child)
    return operator, target, extras


def _cd_target(argv: Sequence[_Word]) -> str:
    words = [w for w in argv[1:] if w.text not in ("-L", "-P", "-e", "-@", "--")]
    if not words:
        raise _Denied("cd without a directory goes to HOME, outside the worktree")
    target = words[0]
    if target.text is None:
        raise _Denied(f"cd {target.shown}: the directory is not a literal")
    if target.text == "-":
        raise _Denied("cd - goes back to a directory the policy cannot see")
    if target.tilde or target.glob or target.brace:
        raise _Denied(f"cd {target.shown}: the directory would be expanded by the shell")
    return target.text


def _opens_pager(text: str) -> bool:
    """Whether a `git grep` argument is -O/--open-files-in-pager, clustered or abbreviated as git allows."""
    if text.startswith("--"):
        written = text.partition("=")[0]
        return written != "--" and "--open-files-in-pager".startswith(written)
    for letter in text[1:] if text.startswith("-") else "":
        if letter == "O":
            return True
        if letter in "efABCm":  # the rest of the cluster is this option's value
            return False
    return False


def _glob_expansions(word: _Word, base: str, what: str) -> list[str]:
    """What bash expands an unquoted pattern to in `base` (Python's glob reads [^a] as a set holding '^')."""
    pattern = word.text or word.prefix
    if re.search(r"\[([:=.]).*?\1\]", pattern):
        raise _Denied(
            f"{what}: the pattern {word.shown} has a bracket class ([[:alpha:]]) the policy cannot expand"
        )
    pattern = pattern.replace("[^", "[!")
    matches = glob.iglob(pattern, root_dir=None if os.path.isabs(pattern) else base)
    return list(itertools.islice(matches, MAX_GLOB_MATCHES))


def _as_positional(word: _Word) -> _Word:
    """A word known to be an operand: a leading '-' does not make it an option."""
    if word.text is not None and word.text.startswith("-") and word.text != "-":
        return _Word.literal("./" + word.text)
    return word


def _pathlike(text: str) -> bool:
    return text.startswith(("/", "~")) or ".." in PurePosixPath(text).parts


def _descendants(node: Node) -> Iterator[Node]:
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        stack.extend(reversed(current.children))


def _has_syntax_error(root: Node) -> bool:
    return root.has_error or any(n.is_error or n.is_missing for n in _descendants(root))


def _backtick_body(node: Node) -> str:
    """The code inside `...` as bash reads it: \\`, \\$ and \\\\ (and \\" within double quotes) unescaped."""
    raw = _text(node)[1:-1]
    in_double_quotes = False
    parent = node.parent
    while parent is not None:
        if parent.type == "string":
            in_double_quotes = True
            break
        parent = parent.parent
    return _unescape(raw, '$`\\"' if in_double_quotes else "$`\\")


# --- paths -----------------------------------------------------------------------------------------


class _Paths:
    """Where a path really points (symlinks resolved) and whether the policy lets the agent touch it."""

    def __init__(self, worktree: Path, allow_ci_config_writes: bool) -> None:
        self.root = os.path.realpath(worktree)
        self.allow_ci = allow_ci_config_writes

    def inside(self, resolved: str) -> bool:
        return resolved == self.root or resolved.startswith(self.root.rstrip(os.sep) + os.sep)

    def problem(self, base: str, text: str, *, write: bool, delete_tree: bool = False) -> str | None:
        """Why touching `text` (relative to `base`) is not allowed, or None."""
        if "\0" in text:
            return "a path with a NUL byte"
        if text.startswith("~"):
            return f"{_short(text)} is in a home directory, outside the worktree"
        if text.startswith(("/dev/", "/proc/")):
            return f"{_short(text)} is a device or process file, outside the worktree"
        joined = os.path.join(base, text)
        resolved = os.path.realpath(joined)
        if not self.inside(resolved):
            return f"{_short(text)} resolves to {_short(resolved)}, outside the worktree"
        if not write:
            return None
        lexical = os.path.normpath(joined)
        for path in {lexical, resolved}:
            if not self.inside(path):
                continue
            rel = os.path.relpath(path, self.root).replace(os.sep, "/")
            lowered = rel.lower()
            if rel == ".":
                if delete_tree:
                    continue
                return f"{_short(text)} is the worktree root itself (it holds .git and the CI configuration)"
            if ".git" in PurePosixPath(lowered).parts:
                return f"{_short(text)} is inside .git; writes there are not allowed"
            if (
                not self.allow_ci
                and (is_ci_config_path(rel) or lowered == ".github")
                and not (delete_tree and lowered == ".github")
            ):
                return f"{_short(text)} is CI configuration; writes need ALLOW_CI_CONFIG_WRITES"
        return None


# --- the policy ------------------------------------------------------------------------------------


class AgentPolicy:
    """Decides every tool call of the agent: file tools by path, Bash by parsing the command."""

    def __init__(self, config: PolicyConfig) -> None:
        for name in config.extra_allowed_commands:
            if not name or "/" in name or any(c.isspace() for c in name):
                raise ConfigError(f"AGENT_ALLOWED_COMMANDS: {name!r} is not a command name")
            if name in ALWAYS_DENIED_COMMANDS or name in ("eval", *_SHELLS):
                raise ConfigError(f"AGENT_ALLOWED_COMMANDS: {name} cannot be allowed")
        self.config = config
        self.paths = _Paths(config.worktree, config.allow_ci_config_writes)
        self.extra_commands = config.extra_allowed_commands
        self._language = Language(tree_sitter_bash.language())

    def parser(self) -> Parser:
        """A fresh parser (cheap; parsers are not shared between concurrent checks)."""
        return Parser(self._language)

    def check_bash(
        self, command: str, *, run_in_background: bool = False, cwd: Path | None = None
    ) -> Decision:
        """Allow or deny one Bash tool call; relative paths resolve against `cwd` (default: the worktree)."""
        if run_in_background:
            return Decision(False, "Bash run_in_background: background commands are not allowed")
        if not isinstance(command, str) or not command.strip():
            return Decision(False, "Bash: an empty command")
        if len(command) > MAX_COMMAND_LENGTH:
            return Decision(False, f"Bash: a command longer than {MAX_COMMAND_LENGTH} characters")
        try:
            _BashCheck(self, self._bases(cwd), depth=0).source(command)
        except _Denied as denied:
            return Decision(False, f"Bash command denied: {denied.reason}")
        except RecursionError:
            return Decision(False, "Bash command denied: nested too deeply to check")
        except Exception as error:  # a bug in the policy fails closed: the command does not run
            log.exception("bash policy check raised", error=type(error).__name__)
            return Decision(False, f"Bash command denied: internal policy error: {_short(repr(error))}")
        return Decision(True, "allowed by the command policy")

    def _bases(self, cwd: Path | None) -> list[str]:
        if cwd is None:
            return [self.paths.root]
        resolved = os.path.realpath(cwd)
        if not self.paths.inside(resolved):
            raise _Denied(f"the shell's working directory {_short(str(cwd))} is outside the worktree")
        return [resolved]

    def check_tool(
        self, tool_name: str, tool_input: Mapping[str, Any], *, cwd: Path | None = None
    ) -> Decision:
        """Allow or deny one tool call of any kind (Bash included), relative paths against `cwd`."""
        try:
            return self._check_tool(tool_name, tool_input, cwd)
        except _Denied as denied:
            return Decision(False, denied.reason)

    def _check_tool(self, tool_name: str, tool_input: Mapping[str, Any], cwd: Path | None) -> Decision:
        if tool_name == "Bash":
            if tool_input.get("dangerouslyDisableSandbox"):
                return Decision(False, "Bash dangerouslyDisableSandbox: disabling the sandbox is not allowed")
            command = tool_input.get("command")
            if not isinstance(command, str):
                return Decision(False, "Bash: the command is missing or not a string")
            return self.check_bash(
                command,
                run_in_background=bool(tool_input.get("run_in_background")),
                cwd=cwd,
            )
        if tool_name in DENIED_TOOLS:
            return Decision(False, f"{tool_name}: this tool is denied to the agent by default")
        if tool_name in PATHLESS_TOOLS:
            return Decision(True, f"{tool_name} touches no files")
        if tool_name not in READ_TOOLS and tool_name not in WRITE_TOOLS:
            return Decision(False, f"{tool_name}: not a tool the policy knows; unknown tools are denied")
        write = tool_name in WRITE_TOOLS
        if write and self.config.read_only:
            return Decision(False, f"{tool_name}: this session is read-only")
        base = self._bases(cwd)[0]
        for key in _PATH_KEYS:
            if key not in tool_input or (tool_input[key] is None and key == "path"):
                continue
            value = tool_input[key]
            if not isinstance(value, str) or not value:
                return Decision(False, f"{tool_name}: {key} must be a non-empty string")
            problem = self.paths.problem(base, value, write=write)
            if problem:
                return Decision(False, f"{tool_name} {key}: {problem}")
        if write and not any(isinstance(tool_input.get(k), str) for k in _PATH_KEYS):
            return Decision(False, f"{tool_name}: no file_path given")
        pattern = tool_input.get("pattern")
        if tool_name == "Glob" and isinstance(pattern, str):
            if ".." in PurePosixPath(pattern).parts:
                return Decision(False, f"Glob pattern {_short(pattern)}: patterns may not climb out with ..")
            if pattern.startswith(("/", "~")):
                fixed = re.split(r"[*?\[{]", pattern, maxsplit=1)[0]
                problem = self.paths.problem(base, fixed.rsplit("/", 1)[0] or "/", write=False)
                if problem:
                    return Decision(False, f"Glob pattern: {problem}")
        return Decision(True, f"{tool_name} within the worktree")


# --- the hook --------------------------------------------------------------------------------------


def _hook_output(decision: Decision) -> HookJSONOutput:
    return {
        "hookSpecificOutput": {
            "hookEventName": "PreToolUse",
            "permissionDecision": "allow" if decision.allowed else "deny",
            "permissionDecisionReason": decision.reason,
        }
    }


def pre_tool_use_hook(
    policy: AgentPolicy, on_denial: Callable[[str, Mapping[str, Any], str], None]
) -> HookCallback:
    """A PreToolUse hook callback answering allow/deny from `policy`; every denial goes to `on_denial`."""

    async def hook(input_data: HookInput, tool_use_id: str | None, context: HookContext) -> HookJSONOutput:
        if input_data["hook_event_name"] != "PreToolUse":
            return {}
        tool_name = str(input_data.get("tool_name", ""))
        raw_input = input_data.get("tool_input")
        tool_input: Mapping[str, Any] = raw_input if isinstance(raw_input, Mapping) else {}
        cwd = input_data.get("cwd")
        try:
            decision = policy.check_tool(tool_name, tool_input, cwd=Path(cwd) if cwd else None)
        except Exception:
            log.exception("policy check failed", tool=tool_name, tool_use_id=tool_use_id)
            decision = Decision(False, f"{tool_name}: the policy check failed, so the call is denied")
        if not decision.allowed:
            try:
                on_denial(tool_name, tool_input, decision.reason)
            except Exception:
                log.exception("recording a policy denial failed", tool=tool_name, tool_use_id=tool_use_id)
        return _hook_output(decision)

    return hook


def hook_matchers(
    policy: AgentPolicy, on_denial: Callable[[str, Mapping[str, Any], str], None]
) -> dict[HookEvent, list[HookMatcher]]:
    """`ClaudeAgentOptions(hooks=...)`: the policy for every tool; a hook that fails blocks the call."""
    hook = pre_tool_use_hook(policy, on_denial)
    return {"PreToolUse": [HookMatcher(matcher=None, hooks=[hook], on_failure="block")]}


# --- the environment -------------------------------------------------------------------------------

DENIED_ENV_NAMES = frozenset(
    {"GH_TOKEN", "GITHUB_TOKEN", "GH_ENTERPRISE_TOKEN", "GITHUB_ENTERPRISE_TOKEN", "WEBHOOK_SECRET",
     "API_TOKEN", "DATABASE_URL", "SSH_AUTH_SOCK", "GIT_ASKPASS", "SSH_ASKPASS"}
)  # fmt: skip
DENIED_ENV_PREFIXES = ("JIRA_", "LANGFUSE_", "DBOS_", "AWS_", "GOOGLE_APPLICATION_")
DENIED_ENV_PARTS = ("SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "PRIVATE_KEY")
DENIED_ENV_SUFFIXES = ("_TOKEN", "_API_KEY", "_ACCESS_KEY")
_AGENT_SETTING_PREFIXES = ("ANTHROPIC_", "CLAUDE_CODE_", "CLAUDE_AGENT_SDK_")
_AGENT_SETTINGS = frozenset(
    {"API_TIMEOUT_MS", "IS_SANDBOX", "DISABLE_TELEMETRY", "DISABLE_AUTOUPDATER", "DISABLE_ERROR_REPORTING",
     "MAX_THINKING_TOKENS", "BASH_DEFAULT_TIMEOUT_MS", "BASH_MAX_TIMEOUT_MS", "MCP_TIMEOUT"}
)  # fmt: skip


def is_denied_env_name(name: str) -> bool:
    """True for a variable that must never reach the agent (tokens, secrets, service credentials)."""
    upper = name.upper()
    return (
        upper in DENIED_ENV_NAMES
        or upper.startswith(DENIED_ENV_PREFIXES)
        or any(part in upper for part in DENIED_ENV_PARTS)
        or upper.endswith(DENIED_ENV_SUFFIXES)
    )


def agent_environment(
    *,
    home: Path,
    config_dir: Path,
    anthropic: Mapping[str, str],
    passthrough: Iterable[str],
    source: Mapping[str, str],
) -> dict[str, str]:
    """The whole environment of the agent's CLI, built from nothing rather than filtered from the service's.

    It holds PATH (a plain default when `source` has none), LANG and LC_ALL when `source` has them,
    HOME=`home`, CLAUDE_CONFIG_DIR=`config_dir`, the `anthropic` settings (names starting ANTHROPIC_,
    CLAUDE_CODE_ or CLAUDE_AGENT_SDK_, or a known CLI setting such as API_TIMEOUT_MS; anything else
    raises ValueError), and each `passthrough` name present in `source`, except a denied name
    (`is_denied_env_name`: GH_TOKEN, GITHUB_TOKEN, GH_ENTERPRISE_TOKEN, WEBHOOK_SECRET, API_TOKEN,
    DATABASE_URL, JIRA_*, LANGFUSE_*, DBOS_*, AWS_*, *SECRET*, *PASSWORD*, *CREDENTIAL*, *_TOKEN,
    *_API_KEY, ...), which is dropped even when passed through. The SDK merges `os.environ` into the
    CLI's environment, so the caller must start the CLI from a clean environment (e.g. an `env -i`
    wrapper as `cli_path`) for this to be the only environment it gets.
    """
    env = {"PATH": source.get("PATH") or "/usr/local/bin:/usr/bin:/bin"}
    for name in ("LANG", "LC_ALL"):
        if source.get(name):
            env[name] = source[name]
    for name in passthrough:
        if name in ("HOME", "CLAUDE_CONFIG_DIR") or is_denied_env_name(name) or name not in source:
            continue
        env[name] = source[name]
    for name, value in anthropic.items():
        if not (name.startswith(_AGENT_SETTING_PREFIXES) or name in _AGENT_SETTINGS):
            raise ValueError(f"{name} is not an Anthropic or Claude Code setting")
        env[name] = value
    env["HOME"] = str(home)
    env["CLAUDE_CONFIG_DIR"] = str(config_dir)
    return env
