"""The shell's own commands and variables: set, test and [, read, printf, cd, and the names assigned.

It decides which variables may be set (none that change which program runs or how a command reads
its arguments), which `set` and `-o` options keep bash reading commands as the policy reads them,
where `test` may hold an expansion, and where `cd` may go. The commands without paths (echo, pwd,
...) get their one rule here: no `-v`, which assigns or evaluates array subscripts. It trusts the
words as words.py read them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from app.agent.guard.commands import Via
from app.agent.guard.denial import Denied, shorten
from app.agent.guard.options import literal_argument, whole
from app.agent.guard.paths import PathCheck
from app.agent.guard.words import Word

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Variables that change which program runs, what a shell does at start-up, or how a command reads its
# arguments (POSIXLY_CORRECT ends GNU options at the first operand; ripgrep reads options from a file).
_DENIED_ASSIGNMENTS = frozenset(
    {"PATH", "ENV", "SHELLOPTS", "BASHOPTS", "PS1", "PS2", "PS3", "PS4", "PROMPT_COMMAND",
     "CDPATH", "HOME", "SHELL", "PAGER", "EDITOR", "VISUAL", "GCONV_PATH", "GLOBIGNORE",
     "POSIXLY_CORRECT", "RIPGREP_CONFIG_PATH"}
)  # fmt: skip
_DENIED_ASSIGNMENT_PREFIXES = ("LD_", "DYLD_", "BASH_", "GIT_")
# `set` and `bash -o` options that leave bash reading commands as the policy reads them: not -k (then
# `ls PATH=/x` sets PATH for ls) nor history expansion (-H, -o history: `!!` rewrites a line before parsing).
_SET_FLAGS = "abefhmnuvxBCEPT"
_SHELL_OPTION_NAMES = frozenset(
    {"allexport", "braceexpand", "errexit", "errtrace", "functrace", "hashall", "monitor", "noclobber",
     "noexec", "noglob", "notify", "nounset", "physical", "pipefail", "verbose", "xtrace"}
)  # fmt: skip
_TEST_UNARY = frozenset(
    {"-a", "-b", "-c", "-d", "-e", "-f", "-g", "-h", "-k", "-p", "-r", "-s", "-t", "-u", "-w", "-x", "-G",
     "-L", "-N", "-O", "-S", "-z", "-n", "-o", "!"}
)  # fmt: skip
_TEST_BINARY = frozenset(
    {"=", "==", "!=", "<", ">", "-eq", "-ne", "-lt", "-le", "-gt", "-ge", "-nt", "-ot", "-ef", "-a", "-o"}
)


def check_variable_name(name: str) -> None:
    """A variable may be set when its name is a plain identifier that changes no program or option."""
    if not IDENTIFIER.fullmatch(name):
        raise Denied(f"variable name {shorten(name)!r} is not a plain identifier")
    upper = name.upper()
    if upper in _DENIED_ASSIGNMENTS or upper.startswith(_DENIED_ASSIGNMENT_PREFIXES):
        raise Denied(
            f"setting {name} is not allowed (it changes which programs or code run, or how they read "
            "their arguments)"
        )


def check_shell_option(option: str, command: str) -> None:
    """`set -o` and `bash -o` may name only options that keep bash reading commands as written."""
    if option not in _SHELL_OPTION_NAMES:
        raise Denied(f"{command} -o {option}: not allowed (it could change how bash reads commands)")


def no_path(argv: Sequence[Word]) -> None:
    """A command whose arguments are not paths: only -v, `read`, `set`, `test` and printf's format matter."""
    name = argv[0].text
    if name in ("printf", "test", "[") and any(w.text in ("-v", "-R") for w in argv[1:]):
        raise Denied(f"{name} -v is not allowed (it assigns or evaluates array subscripts)")
    if name == "read":
        _read_builtin(argv)
    elif name == "set":
        _set_builtin(argv)
    elif name in ("test", "["):
        _test_operands(argv[1:-1] if name == "[" and argv[-1].text == "]" else argv[1:])
    elif name == "printf" and len(argv) > 1:
        leading = argv[2] if argv[1].text == "--" and len(argv) > 2 else argv[1]
        if leading.text is None:
            raise Denied("printf with a non-literal format could take options such as -v; not allowed")


def _read_builtin(argv: Sequence[Word]) -> None:
    i = 1
    while i < len(argv):
        text = literal_argument(argv[i], "read")
        if text.startswith("-") and len(text) > 1:
            if text[-1] in "dptnNui" and len(text) == 2:
                whole(argv[i + 1] if i + 1 < len(argv) else None, "read")
                i += 1
        elif not IDENTIFIER.fullmatch(text):
            raise Denied(f"read {shorten(text)}: only plain variable names are allowed")
        else:
            check_variable_name(text)
        i += 1


def _set_builtin(argv: Sequence[Word]) -> None:
    """`set` may turn on only the flags and -o options that keep bash reading commands as written."""
    i = 1
    while i < len(argv):
        text = literal_argument(argv[i], "set")
        i += 1
        if text in ("-", "--") or text[:1] not in ("-", "+"):
            return  # the rest are positional parameters
        for letter in text[1:]:
            if letter == "o":
                if i < len(argv):  # `set -o` alone lists the options
                    check_shell_option(literal_argument(argv[i], "set"), "set")
                i += 1
            elif letter not in _SET_FLAGS:
                raise Denied(
                    f"set -{letter}: not allowed (it could change how bash reads the commands that follow)"
                )


def _test_operands(args: Sequence[Word]) -> None:
    """Expansions in `test`/`[` must sit where bash reads an operand, never where it reads an operator."""
    if all(w.text is not None for w in args):
        return
    if any(w.split for w in args):
        raise Denied("test with an unquoted expansion: bash may split it into operators such as -v")
    texts = [w.text for w in args]
    if len(args) == 1 or (len(args) == 2 and texts[0] is not None):
        return
    if len(args) == 3 and texts[1] in _TEST_BINARY:
        return
    for index, text in enumerate(texts):
        if text is None and (index == 0 or texts[index - 1] not in _TEST_UNARY | _TEST_BINARY):
            raise Denied("test with an expansion where bash could read an operator such as -v")


def cd(paths: PathCheck, argv: Sequence[Word], via: Via) -> None:
    """`cd` runs plain (not through a wrapper) to a directory inside the worktree."""
    if via.wrapper:
        raise Denied(f"cd through {via.wrapper} is not allowed; use a plain cd")
    paths.cd_destinations(cd_target(argv))


def cd_target(argv: Sequence[Word]) -> str:
    """The literal directory a `cd` goes to; Denied when the shell would choose or expand it."""
    words = [w for w in argv[1:] if w.text not in ("-L", "-P", "-e", "-@", "--")]
    if not words:
        raise Denied("cd without a directory goes to HOME, outside the worktree")
    target = words[0]
    if target.text is None:
        raise Denied(f"cd {target.shown}: the directory is not a literal")
    if target.text == "-":
        raise Denied("cd - goes back to a directory the policy cannot see")
    if target.tilde or target.glob or target.brace:
        raise Denied(f"cd {target.shown}: the directory would be expanded by the shell")
    return target.text
