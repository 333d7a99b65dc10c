"""The commands that run another command or shell code: env, timeout, nice, nohup, time, command, exec,
xargs, find -exec, bash -c and source.

It decides how each wrapper's own options are read and where its inner command starts, then hands that
command back to the Bash check (`Check.argv`, or `Check.nested` for a command string) with a `Via` that
says what the wrapper does to it: xargs appends arguments the policy cannot see, find's `{}` stands
for paths under its checked start paths. It denies what cannot be checked (a shell reading stdin,
`find -execdir`, `-L`, `exec` without a command). It trusts the Bash check to apply every rule to the
inner command as to one written out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from app.agent.guard.check import Check
from app.agent.guard.commands import Via
from app.agent.guard.denial import Denied
from app.agent.guard.options import hide_marked, literal_argument, skip_options, whole
from app.agent.guard.shell_builtins import check_shell_option, check_variable_name
from app.agent.guard.words import Word

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
# find tests whose value may be an expansion (anywhere else in the expression it could be -exec).
_FIND_VALUED_TESTS = frozenset(
    {"-name", "-iname", "-path", "-ipath", "-wholename", "-iwholename", "-lname", "-ilname", "-regex",
     "-iregex", "-regextype", "-type", "-xtype", "-size", "-perm", "-user", "-group", "-uid", "-gid",
     "-anewer", "-cnewer", "-mtime", "-atime", "-ctime", "-mmin", "-amin", "-cmin", "-maxdepth",
     "-mindepth", "-links", "-inum", "-samefile", "-used", "-fstype", "-context", "-printf"}
)  # fmt: skip
_ENV_FLAGS = frozenset({"-i", "--ignore-environment", "-0", "--null", "-v", "--debug"})


def source(check: Check, argv: Sequence[Word], via: Via) -> None:
    if len(argv) < 2:
        raise Denied(f"{argv[0].text} without a file")
    check.runs_project_code(argv[0].text or "source")
    check.paths.path(argv[1], f"{argv[0].text} (runs a file as shell code)", write=False, devices=False)
    check.paths.paths_in(argv[2:], via, write=False, name=argv[0].text or "source", only_pathlike=True)


def shell(check: Check, argv: Sequence[Word], via: Via) -> None:
    name = argv[0].text or "sh"
    i = 1
    command_mode = False
    while i < len(argv):
        text = argv[i].text
        if text is None:
            if command_mode:
                break
            raise Denied(f"{name} with a non-literal argument {argv[i].shown}")
        if text == "--":
            i += 1
            break
        if text in ("-o", "+o"):
            if i + 1 < len(argv):
                check_shell_option(literal_argument(argv[i + 1], name), name)
            i += 2
            continue
        if text.startswith("--"):
            if text not in ("--norc", "--noprofile", "--posix"):
                raise Denied(f"{name} {text}: option not allowed")
        elif text.startswith(("-", "+")) and len(text) > 1:
            for flag in text[1:]:
                if flag == "c":
                    command_mode = True
                elif flag not in "euxvlnf":
                    raise Denied(f"{name} -{flag}: option not allowed")
        else:
            break
        i += 1
    if command_mode:
        if i >= len(argv):
            raise Denied(f"{name} -c without a command string")
        script = argv[i]
        if script.placeholder:
            raise Denied(f"find -exec {name} -c {{}}: file names would run as shell code")
        if script.text is None:
            raise Denied(f"{name} -c {script.shown}: the command string is not a literal")
        check.nested(script.text)
        return
    if i >= len(argv):
        raise Denied(f"{name} reading commands from stdin cannot be checked; use {name} -c '...'")
    check.runs_project_code(f"{name} {argv[i].shown}")
    check.paths.path(argv[i], f"{name} (runs a script)", write=False, devices=False)
    check.paths.paths_in(argv[i + 1 :], via, write=False, name=name, only_pathlike=True)


def env(check: Check, argv: Sequence[Word], via: Via) -> None:
    i = skip_options(argv, _ENV_FLAGS, {"-u", "--unset"})
    if i < len(argv) and argv[i].text == "-":  # like -i
        i += 1
    while i < len(argv) and "=" in (assignment := literal_argument(argv[i], "env")):
        check_variable_name(assignment.split("=", 1)[0])
        i += 1
    check.argv(argv[i:], via.through("env"))


def timeout(check: Check, argv: Sequence[Word], via: Via) -> None:
    i = skip_options(
        argv,
        {"--preserve-status", "--foreground", "-v", "--verbose"},
        {"-s", "-k", "--signal", "--kill-after"},
    )
    check.argv(argv[i + 1 :], via.through("timeout"))


def nice(check: Check, argv: Sequence[Word], via: Via) -> None:
    words = [w for w in argv if not (w.text and re.fullmatch(r"-\d+", w.text))]
    i = skip_options(words, (), {"-n", "--adjustment"})
    check.argv(words[i:], via.through("nice"))


def nohup(check: Check, argv: Sequence[Word], via: Via) -> None:
    check.argv(argv[1:], via.through("nohup"))


def time_command(check: Check, argv: Sequence[Word], via: Via) -> None:
    i = skip_options(argv, {"-p"}, ())
    check.argv(argv[i:], via.through("time"))


def command_builtin(check: Check, argv: Sequence[Word], via: Via) -> None:
    flags = [w.text for w in argv[1:] if w.text and w.text.startswith("-")]
    if any(f in ("-v", "-V") for f in flags):
        return  # only describes the name
    i = skip_options(argv, {"-p"}, ())
    check.argv(argv[i:], via.through("command"))


def exec_command(check: Check, argv: Sequence[Word], via: Via) -> None:
    i = skip_options(argv, {"-c", "-l"}, {"-a"})
    if i >= len(argv):
        raise Denied("exec without a command changes the shell's redirections; not allowed")
    check.argv(argv[i:], via.through("exec"))


def xargs(check: Check, argv: Sequence[Word], via: Via) -> None:
    replace: str | None = None

    def replace_string_and_arg_file(text: str, following: Word | None) -> int | None:
        nonlocal replace
        if text == "-I":
            replace = following.text if following else None
            if replace is None:
                raise Denied("xargs -I without a literal replace string")
            return 2
        if text.startswith(("-I", "-i", "--replace")):
            replace = text[2:] if text.startswith(("-I", "-i")) else text.partition("=")[2]
            replace = replace or "{}"
            return 1
        if text.startswith(("-a", "--arg-file")):
            attached = text.partition("=")[2] if text.startswith("--") else text[2:]
            value = attached or (following.text if following else None)
            check.paths.read_path(Word(value, value or ""), "xargs -a")
        return None

    i = skip_options(
        argv, _XARGS_FLAGS, _XARGS_VALUED, optional=_XARGS_OPTIONAL, hook=replace_string_and_arg_file
    )
    inner = list(argv[i:]) or [Word.literal("echo")]
    if replace:
        inner = hide_marked(inner, replace)
    check.argv(inner, via.through("xargs", stdin_args=True))


def find(check: Check, argv: Sequence[Word], via: Via) -> None:
    if via.stdin_args:
        raise Denied("xargs find: xargs would pass paths the policy cannot check")
    i = 1
    while i < len(argv) and (argv[i].text or "x")[:2] in ("-H", "-P", "-L", "-D", "-O"):
        if argv[i].text == "-L":
            raise Denied("find -L follows symlinks out of the worktree; not allowed")
        i += 2 if argv[i].text == "-D" else 1
    starts: list[Word] = []
    while i < len(argv):
        text = argv[i].text
        if text is not None and (text.startswith("-") or text in ("(", ")", "!", ",")):
            break
        starts.append(argv[i])
        i += 1
    starts = starts or [Word.literal(".")]
    for start_word in starts:
        check.paths.read_path(start_word, "find")
    start_texts = tuple(w.text or "." for w in starts)
    while i < len(argv):
        text = argv[i].text
        previous = argv[i - 1].text or ""
        if text is None and (
            argv[i].split or not (previous in _FIND_VALUED_TESTS or previous.startswith("-newer"))
        ):
            raise Denied(
                f"find {argv[i].shown}: an expansion where find reads its expression could be an action "
                "such as -exec or -delete"
            )
        if text == "-follow":
            raise Denied("find -follow follows symlinks out of the worktree; not allowed")
        if text in ("-execdir", "-okdir"):
            raise Denied(f"find {text} runs commands in directories the policy cannot predict; use -exec")
        if text in ("-exec", "-ok"):
            end = i + 1
            while end < len(argv) and not (
                argv[end].text == ";" or (argv[end].text == "+" and argv[end - 1].text == "{}")
            ):
                end += 1
            if end >= len(argv):
                raise Denied(f"find {text} without a terminating ';' or '+'")
            for word in argv[i + 1 : end]:  # a split word could end the command early with a ';'
                whole(word, f"find {text}")
            _find_exec(check, argv[i + 1 : end], start_texts, via)
            i = end + 1
            continue
        if text == "-files0-from":
            raise Denied("find -files0-from reads its start paths from a file the policy cannot check")
        if text == "-delete":
            for start in start_texts:
                check.paths.path(Word.literal(start), "find -delete", write=True, delete_tree=True)
        if text in ("-fprint", "-fprint0", "-fls", "-fprintf") and i + 1 < len(argv):
            check.paths.write_path(argv[i + 1], f"find {text}")
            i += 2 if text == "-fprintf" else 1  # and -fprintf's format
        i += 1


def _find_exec(check: Check, inner: Sequence[Word], starts: tuple[str, ...], via: Via) -> None:
    if not inner:
        raise Denied("find -exec without a command")
    if any(w.text == "{}" for w in inner):
        for start in starts:
            replaced = [Word(start, start, placeholder=True) if w.text == "{}" else w for w in inner]
            check.argv(hide_marked(replaced, "{}"), via.through("find -exec", in_find=True))
    else:
        check.argv(hide_marked(inner, "{}"), via.through("find -exec"))
