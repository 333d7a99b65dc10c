"""Where a path really points and whether the agent may touch it: inside the worktree, out of .git and CI.

It decides, for a path (symlinks resolved) and for a command's words read as paths from every
directory the shell may be in (globs expanded as bash would), whether reading or writing is allowed:
everything must resolve inside the worktree, and writes must stay out of `.git/` and CI configuration
(`is_ci_config_path`, also used to re-check a diff before commit). It trusts the filesystem as it is
when the check runs, and the words as words.py read them.
"""

from __future__ import annotations

import fnmatch
import glob
import itertools
import os
import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from app.agent.guard.commands import Via
from app.agent.guard.denial import Denied, shorten
from app.agent.guard.options import as_positional
from app.agent.guard.words import Word

MAX_GLOB_MATCHES = 10_000

# Where writes need allow_ci_config_writes (matched case-insensitively on the worktree-relative path).
_CI_DIRECTORIES = (".github/workflows", ".github/actions", ".circleci", ".buildkite")
_CI_FILES = frozenset(
    {".gitlab-ci.yml", "jenkinsfile", "azure-pipelines.yml", "bitbucket-pipelines.yml", ".travis.yml",
     ".drone.yml", ".gitlab-ci.yaml", "azure-pipelines.yaml", ".travis.yaml", ".drone.yaml"}
)  # fmt: skip
_DEVICES_READ = frozenset({"/dev/null", "/dev/stdin"})
_DEVICES_WRITE = frozenset({"/dev/null", "/dev/stdout", "/dev/stderr"})


def is_ci_config_path(relative: str) -> bool:
    """True when a worktree-relative path is CI configuration (also for re-checking a diff before commit)."""
    rel = PurePosixPath(relative.replace("\\", "/").lower()).as_posix().lstrip("/")
    if rel.startswith("./"):
        rel = rel[2:]
    if any(rel == d or rel.startswith(d + "/") for d in _CI_DIRECTORIES):
        return True
    return PurePosixPath(rel).name in _CI_FILES


class Worktree:
    """Where a path really points (symlinks resolved) and whether the policy lets the agent touch it."""

    def __init__(self, worktree: Path, allow_ci_config_writes: bool) -> None:
        self.root = os.path.realpath(worktree)
        self.allow_ci = allow_ci_config_writes

    def inside(self, resolved: str) -> bool:
        """Whether a resolved path is the worktree or under it."""
        return resolved == self.root or resolved.startswith(self.root.rstrip(os.sep) + os.sep)

    def problem(self, base: str, text: str, *, write: bool, delete_tree: bool = False) -> str | None:
        """Why touching `text` (relative to `base`) is not allowed, or None."""
        if "\0" in text:
            return "a path with a NUL byte"
        if text.startswith("~"):
            return f"{shorten(text)} is in a home directory, outside the worktree"
        if text.startswith(("/dev/", "/proc/")):
            return f"{shorten(text)} is a device or process file, outside the worktree"
        joined = os.path.join(base, text)
        resolved = os.path.realpath(joined)
        if not self.inside(resolved):
            return f"{shorten(text)} resolves to {shorten(resolved)}, outside the worktree"
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
                return f"{shorten(text)} is the worktree root itself (it holds .git and the CI configuration)"
            if ".git" in PurePosixPath(lowered).parts:
                return f"{shorten(text)} is inside .git; writes there are not allowed"
            if (
                not self.allow_ci
                and (is_ci_config_path(rel) or lowered == ".github")
                and not (delete_tree and lowered == ".github")
            ):
                return f"{shorten(text)} is CI configuration; writes need ALLOW_CI_CONFIG_WRITES"
        return None


class PathCheck:
    """A command's words checked as paths from every directory the shell may be in; raises Denied."""

    def __init__(self, worktree: Worktree, bases: list[str], *, read_only: bool) -> None:
        self.worktree = worktree
        self.bases = bases  # every directory the shell may be in when a command runs
        self.read_only = read_only

    def glob_matches(self, word: Word, command: str) -> None:
        """The names an unquoted pattern expands to must stay in the worktree and cannot read as options."""
        for base in self.bases:
            for match in _glob_expansions(word, base, command):
                if match.startswith("-"):
                    shown = f"{command} {word.shown}"
                    raise Denied(f"{shown}: the pattern matches {shorten(match)}, an option to {command}")
                problem = self.worktree.problem(base, match, write=False)
                if problem:
                    raise Denied(f"{command} {word.shown}: {problem}")

    def paths_in(
        self,
        words: Sequence[Word],
        via: Via,
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
            raise Denied(
                f"xargs {name}: xargs would pass paths the policy cannot check; use find -exec or -r"
            )
        options_done = False
        for word in words:
            text = word.text
            if text is None:
                if not only_pathlike:
                    raise Denied(f"{name}: argument {word.shown} is not a literal path")
                if pathlike(word.prefix) or word.tilde:
                    self.path(Word(word.prefix, word.prefix, tilde=word.tilde), name, write=write)
                continue
            if not options_done and text == "--":
                options_done = True
                continue
            if not options_done and text.startswith("-") and len(text) > 1:
                _, eq, value = text.partition("=")
                if eq and text.startswith("--") and (write or pathlike(value)):
                    self.path(Word.literal(value), name, write=write)
                continue
            if text == "-" or (only_pathlike and not (pathlike(text) or word.tilde)):
                continue
            self.path(word, name, write=write, delete_tree=delete_tree)

    def operand_paths(self, words: Sequence[Word], via: Via, *, write: bool, name: str) -> None:
        """Check words a command's option parsing found to be operands: a leading '-' is part of a path."""
        self.paths_in([as_positional(w) for w in words], via, write=write, name=name)

    def read_path(self, word: Word, what: str) -> None:
        """Check one path `what` reads."""
        self.path(word, what, write=False)

    def write_path(self, word: Word, what: str) -> None:
        """Check one path `what` writes."""
        self.path(word, what, write=True)

    def path(
        self, word: Word, what: str, *, write: bool, delete_tree: bool = False, devices: bool = True
    ) -> None:
        """Check one path from every directory; `devices` lets /dev/null and the std streams through."""
        if word.text is None:
            raise Denied(f"{what}: {word.shown} is not a literal path")
        text = word.text
        if devices and text in (_DEVICES_WRITE if write else _DEVICES_READ):
            return
        if write and self.read_only:
            raise Denied(f"{what}: {word.shown} would be written, and this session is read-only")
        if word.tilde:
            raise Denied(f"{what}: {word.shown} is in a home directory, outside the worktree")
        if word.brace:
            raise Denied(f"{what}: brace expansion in the path {word.shown} is not allowed")
        if word.glob:
            for part in PurePosixPath(text).parts:
                # bash matches a leading dot only when the pattern spells it (and 5.2+ never matches ..)
                if part.startswith(".") and any(c in part for c in "*?[") and fnmatch.fnmatchcase("..", part):
                    raise Denied(f"{what}: the pattern {word.shown} can match '..'")
        for base in self.bases:
            candidates = [text]
            if word.glob:  # what the shell would expand it to, each match checked (a symlink among them)
                candidates += _glob_expansions(word, base, what)
            for candidate in candidates:
                problem = self.worktree.problem(base, candidate, write=write, delete_tree=delete_tree)
                if problem:
                    raise Denied(f"{what}: {problem}")

    def cd_destinations(self, target: str) -> list[str]:
        """Where `cd target` lands from each working directory; Denied when that is not allowed."""
        destinations = []
        for base in self.bases:
            problem = self.worktree.problem(base, target, write=False)
            if problem:
                raise Denied(f"cd: {problem}")
            destinations.append(os.path.realpath(os.path.join(base, target)))
        return destinations


def _glob_expansions(word: Word, base: str, what: str) -> list[str]:
    """What bash expands an unquoted pattern to in `base` (Python's glob reads [^a] as a set holding '^')."""
    pattern = word.text or word.prefix
    if re.search(r"\[([:=.]).*?\1\]", pattern):
        raise Denied(
            f"{what}: the pattern {word.shown} has a bracket class ([[:alpha:]]) the policy cannot expand"
        )
    pattern = pattern.replace("[^", "[!")
    matches = glob.iglob(pattern, root_dir=None if os.path.isabs(pattern) else base)
    return list(itertools.islice(matches, MAX_GLOB_MATCHES))


def pathlike(text: str) -> bool:
    """Whether a toolchain's argument names a path to check: absolute, in a home directory, or with `..`."""
    return text.startswith(("/", "~")) or ".." in PurePosixPath(text).parts
