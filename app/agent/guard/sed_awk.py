"""What makes a sed script or an awk program given inline unsafe: commands, pipes, files it names.

It decides whether a program may run: a sed script may not execute (`e`, `s///e`) or read or write
files it names (`r`, `w`, `s///w`), and an awk program may not run commands, pipe, redirect output,
`getline` or load extensions. It trusts only the literal text of the program; a program filled in by
find's `{}` or holding an expansion is denied.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from app.agent.guard.denial import Denied, shorten
from app.agent.guard.words import Word


def check_program(word: Word, what: str, problem_of: Callable[[str], str | None]) -> None:
    """Deny `what` ("a sed script") given inline: filled in by find's {}, not a literal, or unsafe."""
    noun = what.partition(" ")[2]
    command = noun.partition(" ")[0]
    if word.placeholder:
        raise Denied(f"find -exec {command} {{}}: file names would run as {what}")
    if word.text is None:
        raise Denied(f"{noun} {word.shown} is not a literal")
    problem = problem_of(word.text)
    if problem:
        raise Denied(f"{command} {shorten(word.text)!r}: {problem}")


def sed_script_problem(script: str) -> str | None:
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


def awk_program_problem(program: str) -> str | None:
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
