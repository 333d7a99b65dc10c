"""The toolchains: python, node, make, npm and the runners that start another program (npx, uv run, ...).

It decides where a runner's own options end and the program it starts begins, and hands that program
back to the Bash check (a script name such as `x.py` as `./x.py`, a package spec such as `pkg@1` as
its bare name); `pnpm NAME` runs NAME when it is neither a pnpm command nor a package.json script.
A toolchain's other arguments are checked only when they name a path (absolute, home, `..`). It trusts
nothing about what the toolchain then does: that is project code, which the sandbox and the network
fence confine, not this policy.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from app.agent.guard.check import Check
from app.agent.guard.commands import Via
from app.agent.guard.denial import Denied
from app.agent.guard.options import literal_argument, whole
from app.agent.guard.words import Word

_SCRIPT_SUFFIXES = (".py", ".js", ".mjs", ".cjs", ".ts", ".sh")
_PNPM_COMMANDS = frozenset(
    {"install", "i", "add", "remove", "rm", "uninstall", "update", "up", "upgrade", "run", "test", "t",
     "start", "list", "ls", "why", "outdated", "audit", "build", "rebuild", "prune", "store", "fetch",
     "import", "link", "unlink", "init", "install-test", "it", "pack", "publish", "root", "bin", "config",
     "c", "help", "env", "setup", "create", "licenses", "patch", "patch-commit", "dedupe", "recursive", "m",
     "multi", "server", "doctor", "cat-file", "cat-index", "find-hash", "deploy", "approve-builds",
     "ignored-builds", "self-update"}
)  # fmt: skip

# toolchains that run other programs: (subcommands that start a program, allowed flags, valued options)
RUNNERS: Mapping[str, tuple[frozenset[str], frozenset[str], frozenset[str]]] = {
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


def toolchain(check: Check, argv: Sequence[Word], via: Via) -> None:
    name = argv[0].text or ""
    if name == "corepack":
        if len(argv) > 1 and argv[1].text in ("npm", "pnpm", "yarn", "npx", "pnpx"):
            check.argv(argv[1:], via.through("corepack"))
            return
        raise Denied("corepack: only corepack npm|pnpm|yarn ... is allowed")
    runner = RUNNERS.get(name)
    if runner is not None:
        _runner(check, argv, via, *runner)
        return
    check.paths.paths_in(argv[1:], via, write=False, name=name, only_pathlike=True)


def _runner(
    check: Check,
    argv: Sequence[Word],
    via: Via,
    subcommands: frozenset[str],
    flags: frozenset[str],
    valued: frozenset[str],
) -> None:
    name = argv[0].text or ""
    texts = [w.text for w in argv]
    start: int | None = 1 if "" in subcommands else None
    if start is None:
        for index, word in enumerate(argv[1:], start=1):
            text = literal_argument(word, name)
            if text in subcommands or (name == "uv" and text == "tool" and texts[index + 1 :][:1] == ["run"]):
                start = index + (2 if text == "tool" else 1)
                break
    if start is None:
        if name == "pnpm":
            _pnpm_fallback(check, argv, via)
        check.paths.paths_in(argv[1:], via, write=False, name=name, only_pathlike=True)
        return
    i = start
    while i < len(argv):
        text = literal_argument(argv[i], name)
        if text == "--":
            i += 1
            break
        if not text.startswith("-"):
            break
        option = text.split("=", 1)[0]
        if text in flags:
            i += 1
        elif text in valued:
            whole(argv[i + 1] if i + 1 < len(argv) else None, name)
            i += 2
        elif option in valued:
            i += 1
        else:
            raise Denied(f"{name} {text}: option not allowed before the program it runs")
    inner = list(argv[i:])
    if not inner:
        return
    program = inner[0].text or ""
    if program.endswith(_SCRIPT_SUFFIXES) and "/" not in program:
        inner[0] = Word.literal("./" + program)
    elif program.startswith("@") or "@" in program[1:]:
        bare = (
            program.rsplit("/", 1)[-1].split("@", 1)[0] if program.startswith("@") else program.split("@")[0]
        )
        inner[0] = Word.literal(bare)
    check.argv(inner, via.through(name))


def _pnpm_fallback(check: Check, argv: Sequence[Word], via: Via) -> None:
    """`pnpm NAME` runs a package.json script, a pnpm command, or else NAME itself."""
    first = next((w for w in argv[1:] if w.text and not w.text.startswith("-")), None)
    if first is None or first.text in _PNPM_COMMANDS:
        return
    if first.text in _package_scripts(check.paths.bases):
        return
    index = list(argv).index(first)
    check.argv(argv[index:], via.through("pnpm"))


def _package_scripts(bases: Sequence[str]) -> set[str]:
    scripts: set[str] = set()
    for base in bases:
        try:
            data = json.loads(Path(base, "package.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("scripts"), dict):
            scripts |= set(data["scripts"])
    return scripts
