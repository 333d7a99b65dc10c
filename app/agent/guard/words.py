"""The command line as bash reads it: tree-sitter-bash nodes turned into words after quote removal.

It decides what each word's text is, or that it is unknown (an expansion sits in it), and which
unquoted characters the shell would still expand (globs, braces, a leading tilde). It trusts
tree-sitter-bash for the shape of the tree, not bashlex: bashlex's last release is from 2023, it raises
on much valid bash (arithmetic, `case`, here-documents in compound commands) and gives no partial tree.
tree-sitter-bash is maintained, covers the whole grammar and is error-tolerant with explicit
ERROR/MISSING nodes, which the policy reads as "could not parse -> deny". Where its tree differs from
what bash runs (the body of a backtick substitution, a backslash-newline inside a word), the policy
re-parses the text or denies.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass

from tree_sitter import Node

from app.agent.guard.denial import shorten

_Segment = tuple[str, bool] | None  # (text, quoted); None where an expansion sits


@dataclass(frozen=True)
class Word:
    """One shell word after quote removal; `text` is None when it holds an expansion."""

    text: str | None
    prefix: str = ""  # the literal text before the first expansion
    glob: bool = False  # unquoted * ? [ (or an extglob)
    brace: bool = False  # unquoted {a,b} or {1..3}
    tilde: bool = False  # unquoted leading ~
    placeholder: bool = False  # find's {}: a file name stands here; `text` is the start path
    split: bool = False  # an unquoted expansion: bash may split it into several words

    @classmethod
    def literal(cls, text: str) -> Word:
        return cls(text, text)

    @property
    def shown(self) -> str:
        return shorten(self.text if self.text is not None else self.prefix + "$…")


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


def node_text(node: Node) -> str:
    """The source text of a node."""
    return (node.text or b"").decode("utf-8", "replace")


def _segments(node: Node, out: list[_Segment]) -> None:
    kind = node.type
    if kind in ("word", "extglob_pattern"):
        out.extend(_unquote_word(node_text(node)))
    elif kind == "number":
        out.append((node_text(node), False))
    elif kind == "raw_string":
        out.append((node_text(node)[1:-1], True))
    elif kind in ("string", "translated_string"):
        for child in node.children:
            if child.type == "string_content":
                out.append((_unescape(node_text(child), '$`"\\\n'), True))
            elif child.type == "$":
                out.append(("$", True))
            elif child.type == '"':
                continue
            elif child.type == "string":
                _segments(child, out)
            else:
                out.append(None)
    elif kind == "ansi_c_string":
        decoded = _decode_ansi_c(node_text(node)[2:-1])
        out.append((decoded, True) if decoded is not None else None)
    elif kind == "concatenation":
        children = node.children
        for index, child in enumerate(children):
            nxt = children[index + 1] if index + 1 < len(children) else None
            if child.type == "$" and nxt is not None and nxt.type == "string":
                continue  # $"..." (a translated string)
            if not child.is_named:
                out.extend((c, False) for c in node_text(child))
            else:
                _segments(child, out)
    elif kind == "brace_expression":
        out.extend((c, False) for c in node_text(node))
    else:
        out.append(None)


def _unquoted_expansion(node: Node) -> bool:
    if node.type in ("simple_expansion", "expansion", "command_substitution", "arithmetic_expansion"):
        return True
    if node.type == "word":
        return any(c in node_text(node) for c in "$`")
    if node.type in ("string", "raw_string", "ansi_c_string", "translated_string", "process_substitution"):
        return False
    return any(_unquoted_expansion(c) for c in node.named_children)


def node_word(node: Node) -> Word:
    """The word a node stands for, as the shell passes it to the command."""
    if node.type == "command_name" and node.named_children:
        node = node.named_children[0]
    if node.type == "process_substitution":  # the shell passes a /dev/fd path
        return Word.literal("/dev/stdin" if node_text(node).startswith("<") else "/dev/stdout")
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
    return Word(
        text=None if dynamic else literal,
        prefix=literal,
        split=dynamic and _unquoted_expansion(node),
        glob=any(c in shape for c in "*?[") or "(" in shape,
        brace=re.search(r"\{[^{}]*(?:,|\.\.)[^{}]*\}", shape) is not None,
        tilde=shape.startswith("~"),
    )


def split_redirect(node: Node) -> tuple[str, Node | None, list[Node]]:
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


def descendants(node: Node) -> Iterator[Node]:
    """`node` and every node under it, in source order."""
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        stack.extend(reversed(current.children))


def has_syntax_error(root: Node) -> bool:
    """Whether the tree holds an ERROR or MISSING node anywhere."""
    return root.has_error or any(n.is_error or n.is_missing for n in descendants(root))


def backtick_body(node: Node) -> str:
    """The code inside `...` as bash reads it: \\`, \\$ and \\\\ (and \\" within double quotes) unescaped."""
    raw = node_text(node)[1:-1]
    in_double_quotes = False
    parent = node.parent
    while parent is not None:
        if parent.type == "string":
            in_double_quotes = True
            break
        parent = parent.parent
    return _unescape(raw, '$`\\"' if in_double_quotes else "$`\\")
