"""A command's options read as its own parser reads them: getopt clusters, GNU long options, `--`.

It decides which words are options (with the full name of an abbreviated long option, and the value
each takes) and which are operands, and denies an unknown or ambiguous option, or an expansion where
the command reads options: the policy cannot tell what either would do. It trusts the words it is
given (words.py) and each command's declared `Syntax`, which must list every long option it has.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

from app.agent.guard.denial import Denied, shorten
from app.agent.guard.words import Word


@dataclass(frozen=True)
class Option:
    """One option as a getopt-style command reads it: `-x` or `--name`, and the value it takes."""

    name: str  # the full name of a long option, even when the command line abbreviates it
    value: Word | None = None  # the attached or the next word; None for a flag or when nothing follows
    attached: str | None = None  # the value's text when the option's own word carried it (`--name=v`, `-xv`)

    @property
    def path(self) -> Word:
        """The value as a path to check: '' (the current directory) when the command line ends first."""
        return self.value or Word.literal("")


@dataclass(frozen=True)
class Syntax:
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


def long_option(written: str, known: Collection[str], *, abbreviations: bool = True) -> str | None:
    """The known long option `written` names: itself, or the only one it abbreviates; None otherwise."""
    if written in known:
        return written
    if not abbreviations or written == "--":
        return None
    matches = [name for name in known if name.startswith(written)]
    return matches[0] if len(matches) == 1 else None


def parse_options(command: str, words: Sequence[Word], syntax: Syntax) -> tuple[list[Option], list[Word]]:
    """Split a command's arguments as its option parser does: its options in order, and its operands.

    Options may follow operands (GNU permutation), and everything after `--` is an operand. An expansion
    is an operand when it cannot become an option, and denied otherwise. A long option is resolved to its
    full name (abbreviations expanded where the command accepts them); an unknown or ambiguous one is
    denied, because the policy cannot tell what it does.
    """
    options: list[Option] = []
    operands: list[Word] = []
    ended = False
    rest = iter(words)

    def take_value() -> Word | None:  # the next word, as an option's value
        return whole(next(rest, None), command)

    for word in rest:
        text = word.text
        if not ended and may_be_option(word):
            raise Denied(f"{command} {word.shown}: an expansion here could be an option; put it after --")
        if text is None or ended or not text.startswith("-") or text == "-":
            operands.append(word)
        elif text == "--":
            ended = True
        elif text.startswith("--"):
            written, eq, value = text.partition("=")
            name = long_option(written, syntax.long_names, abbreviations=syntax.abbreviations)
            if name is None:
                raise Denied(f"{command} {shorten(written)}: unknown or ambiguous option")
            if eq:
                options.append(Option(name, Word.literal(value), value))
            elif name in syntax.long_paired:
                take_value()
                options.append(Option(name, take_value()))
            else:
                options.append(Option(name, take_value() if name in syntax.long_valued else None))
        else:
            options += _short_options(text[1:], syntax, take_value)
    return options, operands


def _short_options(letters: str, syntax: Syntax, take_value: Callable[[], Word | None]) -> list[Option]:
    """The options of one cluster of short letters; valued ones may take the next words with `take_value`."""
    options: list[Option] = []
    index = 0
    while index < len(letters):
        letter, attached = letters[index], letters[index + 1 :]
        index += 1
        if letter in syntax.short_next:
            digits = "".join(itertools.takewhile(lambda c: c in "0123456789", attached))
            index += len(digits)
            options.append(
                Option("-" + letter, Word.literal(digits) if digits else take_value(), digits or None)
            )
        elif attached and letter in syntax.short_valued + syntax.short_optional:
            options.append(Option("-" + letter, Word.literal(attached), attached))
            break
        elif letter in syntax.short_valued:
            options.append(Option("-" + letter, take_value()))
            break
        else:
            options.append(Option("-" + letter))
    return options


def may_be_option(word: Word) -> bool:
    """Whether an expansion could reach the command as an option: it may start with '-' or split in words."""
    return word.text is None and (word.split or not word.prefix or word.prefix.startswith("-"))


def whole(word: Word | None, command: str) -> Word | None:
    """`word`, which the shell passes as one argument; an unquoted expansion that may split is denied."""
    if word is not None and word.split:
        raise Denied(
            f"{command} {word.shown}: an unquoted expansion could split into more arguments; quote it"
        )
    return word


def literal_argument(word: Word, command: str) -> str:
    """The text of an argument the check must read to know what `command` does; an expansion is denied."""
    if word.text is None:
        raise Denied(f"{command} with a non-literal argument {word.shown}")
    return word.text


def skip_options(
    argv: Sequence[Word],
    flags: Collection[str],
    valued: Collection[str],
    *,
    optional: Collection[str] = (),
    why: str = "option not allowed",
    hook: Callable[[str, Word | None], int | None] | None = None,
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
        text = literal_argument(argv[i], command)
        if text == "--":
            return i + 1
        if not text.startswith("-") or text == "-":
            return i
        if text.startswith("--"):
            written, eq, value = text.partition("=")
            resolved = long_option(written, long_names)
            if resolved is None:
                raise Denied(f"{command} {text}: {why}")
            text = resolved + eq + value
        name = text.partition("=")[0] if text.startswith("--") else text
        width = hook(text, argv[i + 1] if i + 1 < len(argv) else None) if hook else None
        if width is None:
            if text in valued:
                whole(argv[i + 1] if i + 1 < len(argv) else None, command)
                width = 2
            elif text in flags or name in {*valued, *optional} or text.startswith(tuple(attachable)):
                width = 1
            else:
                raise Denied(f"{command} {text}: {why}")
        i += width
    return i


def hide_marked(words: Iterable[Word], marker: str) -> list[Word]:
    """Words holding `marker` (which xargs -I or find -exec replaces) become unknown, keeping their prefix."""
    return [Word(None, w.prefix) if w.text and marker in w.text else w for w in words]


def as_positional(word: Word) -> Word:
    """A word known to be an operand: a leading '-' does not make it an option."""
    if word.text is not None and word.text.startswith("-") and word.text != "-":
        return Word.literal("./" + word.text)
    return word
