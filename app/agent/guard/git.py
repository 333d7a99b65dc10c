"""git: which subcommands and options the agent may run, and the paths they read or write.

It decides that only read-only subcommands run (the service commits and pushes), that `git -c`,
`--config-env` and `--exec-path` are denied with push, remote, config and credential, which `branch`
and `stash` forms only list, and that `git grep -O` (a pager command) is denied. It trusts paths.py for
the paths git reads (`-C`, path-like arguments) and writes (`--output`).
"""

from __future__ import annotations

from collections.abc import Sequence

from app.agent.guard.commands import Via
from app.agent.guard.denial import Denied
from app.agent.guard.options import literal_argument, may_be_option
from app.agent.guard.paths import PathCheck
from app.agent.guard.words import Word

ALWAYS_DENIED_GIT = frozenset({"push", "remote", "config", "credential"})
GIT_READ_SUBCOMMANDS = frozenset(
    {
        "status", "diff", "log", "show", "branch", "rev-parse", "ls-files", "ls-tree", "blame", "grep",
        "describe", "shortlog", "cat-file", "merge-base", "rev-list", "stash", "diff-tree",
        "diff-files", "diff-index", "name-rev", "for-each-ref", "show-ref", "whatchanged", "version",
    }
)  # fmt: skip
_GIT_BRANCH_LISTING = frozenset(
    {"-a", "--all", "-r", "--remotes", "-l", "--list", "-v", "-vv", "--verbose", "--show-current", "--color",
     "--no-color", "--column", "--no-column", "-i", "--ignore-case"}
)  # fmt: skip


def git(paths: PathCheck, argv: Sequence[Word], via: Via) -> None:
    """git: no -c or configuration; only read-only subcommands, whose paths and --output are checked."""
    i = 1
    while i < len(argv):
        text = literal_argument(argv[i], "git")
        if text == "-c" or text.startswith(("-c", "--config-env")):
            raise Denied("git -c: setting git configuration on the command line is always denied")
        if text.startswith("--exec-path"):
            raise Denied("git --exec-path is not allowed")
        if text in ("-C",):
            if i + 1 >= len(argv):
                raise Denied("git -C without a directory")
            paths.read_path(argv[i + 1], "git -C")
            i += 2
            continue
        if text in ("--no-pager", "-P", "--no-replace-objects", "--literal-pathspecs", "--glob-pathspecs",
                    "--noglob-pathspecs", "--icase-pathspecs", "--no-optional-locks"):  # fmt: skip
            i += 1
            continue
        if text in ("--version", "--help", "-h", "-v"):
            return
        if text.startswith("-"):
            raise Denied(f"git {text}: option not allowed")
        break
    if i >= len(argv):
        return
    sub = argv[i].text or ""
    if sub in ALWAYS_DENIED_GIT:
        raise Denied(f"git {sub}: always denied (the service pushes, and git configuration is fixed)")
    if sub not in GIT_READ_SUBCOMMANDS:
        raise Denied(
            f"git {sub}: not allowed; only read-only git commands run (the service commits and pushes)"
        )
    rest = list(argv[i + 1 :])
    texts = [w.text or "" for w in rest]
    options_end = texts.index("--") if "--" in texts else len(rest)
    expansion = next((w for w in rest[:options_end] if may_be_option(w)), None)
    if expansion is not None:
        raise Denied(
            f"git {sub} {expansion.shown}: an expansion here could be an option; write it out, or "
            "put paths after --"
        )
    if sub == "branch":
        _git_branch(texts)
    if sub == "stash" and (not texts or texts[0] not in ("list", "show")):
        raise Denied("git stash: only git stash list and git stash show are allowed")
    if sub == "grep" and any(_opens_pager(t) for t in texts):
        raise Denied("git grep -O runs a pager command; not allowed")
    checked: list[Word] = []
    index = 0
    while index < len(rest):  # diff options are never abbreviated: git keeps unknown ones for later
        text = texts[index]
        if text == "--output" and index + 1 < len(rest):
            paths.write_path(rest[index + 1], f"git {sub} --output")
            index += 2
            continue
        if text.startswith("--output="):
            paths.write_path(Word.literal(text.partition("=")[2]), f"git {sub} --output")
        else:
            checked.append(rest[index])
        index += 1
    paths.paths_in(checked, via, write=False, name=f"git {sub}", only_pathlike=True)


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
                raise Denied(f"git branch {text}: only listing branches is allowed")
        elif not list_mode and previous not in with_commit:
            raise Denied(f"git branch {text}: creating branches is not allowed (the service does it)")
        previous = text


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
