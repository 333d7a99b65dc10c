"""Atlassian Document Format (Jira Cloud's rich text) to readable, markdown-like text; never raises."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

MAX_ADF_DEPTH = 100


def description_text(value: object) -> str:
    """Readable text of a description: a wiki string as it is, ADF converted, anything empty as ""."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, Mapping):
        return adf_to_text(value)
    if isinstance(value, list):
        return adf_to_text({"type": "doc", "content": value})
    return ""


def adf_to_text(node: Mapping[str, Any]) -> str:
    """Readable, markdown-like text of an Atlassian Document Format node (never raises on bad input)."""
    if not isinstance(node, Mapping):
        return ""
    return _block(node, 0).strip()


_INLINE_TYPES = frozenset(
    {"text", "hardBreak", "mention", "emoji", "inlineCard", "status", "date", "placeholder", "mediaInline"}
    | {"inlineExtension"}
)


def _children(node: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    content = node.get("content")
    if not isinstance(content, list):
        return []
    return [child for child in content if isinstance(child, Mapping)]


def _kind(node: Mapping[str, Any]) -> str:
    kind = node.get("type")
    return kind if isinstance(kind, str) else ""


def _attrs(node: Mapping[str, Any]) -> Mapping[str, Any]:
    attrs = node.get("attrs")
    return attrs if isinstance(attrs, Mapping) else {}


def _attr_text(node: Mapping[str, Any], *names: str) -> str:
    attrs = _attrs(node)
    for name in names:
        value = attrs.get(name)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, int | float) and not isinstance(value, bool) and abs(value) < 1e30:
            return str(value)
    return ""


def _blocks(node: Mapping[str, Any], depth: int, separator: str = "\n\n") -> str:
    """Children of a block container: runs of inline nodes joined, blocks separated by `separator`."""
    parts: list[str] = []
    run: list[str] = []
    for child in _children(node):
        if _kind(child) in _INLINE_TYPES:
            run.append(_inline(child, depth + 1))
            continue
        if run:
            parts.append("".join(run))
            run = []
        parts.append(_block(child, depth + 1))
    if run:
        parts.append("".join(run))
    return separator.join(part.strip("\n") for part in parts if part.strip())


def _inline_content(node: Mapping[str, Any], depth: int) -> str:
    """Children of a paragraph-like node, all rendered inline."""
    return "".join(_inline(child, depth + 1) for child in _children(node))


def _inline(node: Mapping[str, Any], depth: int) -> str:
    if depth > MAX_ADF_DEPTH:
        return ""
    kind = _kind(node)
    attrs = _attrs(node)
    if kind == "text":
        return _marked_text(node)
    if kind == "hardBreak":
        return "\n"
    if kind == "mention":
        name = _attr_text(node, "text", "id")
        return name if name.startswith("@") or not name else f"@{name}"
    if kind == "emoji":
        return _attr_text(node, "text", "shortName")
    if kind == "inlineCard":
        data = attrs.get("data")
        return _attr_text(node, "url") or (_attr_text({"attrs": data}, "url") if data else "")
    if kind == "status":
        return _attr_text(node, "text")
    if kind == "date":
        return _date(attrs.get("timestamp"))
    if kind == "mediaInline":
        return _media(node)
    if kind == "placeholder":
        return ""
    return _inline_content(node, depth)


def _marked_text(node: Mapping[str, Any]) -> str:
    text = node.get("text")
    if not isinstance(text, str):
        return ""
    marks = node.get("marks")
    if not isinstance(marks, list):
        return text
    for mark in marks:
        if not isinstance(mark, Mapping):
            continue
        if _kind(mark) == "code":
            text = f"`{text}`"
    for mark in marks:
        if isinstance(mark, Mapping) and _kind(mark) == "link":
            href = _attr_text(mark, "href")
            if href and href != node.get("text"):
                text = f"{text} ({href})"
    return text


def _date(timestamp: object) -> str:
    """ADF dates are UTC midnight in epoch milliseconds, usually as a string."""
    if not isinstance(timestamp, str | int) or isinstance(timestamp, bool):
        return ""
    try:
        millis = int(timestamp)
        return datetime.fromtimestamp(millis / 1000, UTC).date().isoformat()
    except (ValueError, OverflowError, OSError):
        return timestamp if isinstance(timestamp, str) else ""


def _media(node: Mapping[str, Any]) -> str:
    name = _attr_text(node, "alt", "__fileName")
    return f"[attachment: {name}]" if name else "[attachment]"


def _block(node: Mapping[str, Any], depth: int) -> str:
    if depth > MAX_ADF_DEPTH:
        return ""
    kind = _kind(node)
    if kind in _INLINE_TYPES:
        return _inline(node, depth)
    render = _BLOCK_RENDERERS.get(kind)
    if render is None:  # doc, panel, layouts, bodied extensions and anything unknown: the content
        return _blocks(node, depth)
    return render(node, depth)


def _heading(node: Mapping[str, Any], depth: int) -> str:
    level = _attrs(node).get("level")
    level = level if isinstance(level, int) and not isinstance(level, bool) and 1 <= level <= 6 else 1
    return f"{'#' * level} {_inline_content(node, depth).strip()}"


def _list(node: Mapping[str, Any], depth: int) -> str:
    ordered = _kind(node) == "orderedList"
    start = _attrs(node).get("order")
    number = start if isinstance(start, int) and not isinstance(start, bool) and start >= 0 else 1
    lines: list[str] = []
    for item in _children(node):
        marker = f"{number}. " if ordered else "- "
        number += 1
        lines.append(_prefixed(_blocks(item, depth + 1, "\n"), marker))
    return "\n".join(line for line in lines if line.strip())


def _prefixed(text: str, marker: str) -> str:
    """`marker` before the first line, the later lines indented to line up under it."""
    lines = text.split("\n")
    indent = " " * len(marker)
    return "\n".join([marker + lines[0], *(indent + line if line else line for line in lines[1:])])


def _task_list(node: Mapping[str, Any], depth: int) -> str:
    lines: list[str] = []
    for item in _children(node):
        kind = _kind(item)
        if kind in {"taskItem", "decisionItem"}:
            done = kind == "taskItem" and str(_attrs(item).get("state", "")).upper() == "DONE"
            box = ("[x] " if done else "[ ] ") if kind == "taskItem" else ""
            lines.append(_prefixed(_blocks(item, depth + 1, "\n"), f"- {box}"))
        else:  # a nested taskList
            lines.append(_prefixed(_block(item, depth + 1), "  "))
    return "\n".join(line for line in lines if line.strip())


def _code_block(node: Mapping[str, Any], depth: int) -> str:
    language = _attr_text(node, "language")
    code = "".join(_inline(child, depth + 1) for child in _children(node) if _kind(child) == "text")
    return f"```{language}\n{code}\n```"


def _quote(node: Mapping[str, Any], depth: int) -> str:
    text = _blocks(node, depth)
    return "\n".join(f"> {line}" if line else ">" for line in text.split("\n"))


def _rule(node: Mapping[str, Any], depth: int) -> str:
    return "---"


def _table(node: Mapping[str, Any], depth: int) -> str:
    rows: list[str] = []
    for index, row in enumerate(_children(node)):
        cells = [c for c in _children(row) if _kind(c) in {"tableCell", "tableHeader"}]
        texts = [_blocks(c, depth + 2, " ").replace("\n", " ").replace("|", "\\|") for c in cells]
        rows.append("| " + " | ".join(texts) + " |")
        if index == 0 and cells and all(_kind(c) == "tableHeader" for c in cells):
            rows.append("|" + " --- |" * len(cells))
    return "\n".join(rows)


def _media_group(node: Mapping[str, Any], depth: int) -> str:
    return _blocks(node, depth, "\n") or _media(node)


def _card(node: Mapping[str, Any], depth: int) -> str:
    return _attr_text(node, "url")


def _expand(node: Mapping[str, Any], depth: int) -> str:
    title = _attr_text(node, "title")
    body = _blocks(node, depth)
    return f"{title}\n{body}" if title else body


def _paragraph(node: Mapping[str, Any], depth: int) -> str:
    return _inline_content(node, depth)


def _media_node(node: Mapping[str, Any], depth: int) -> str:
    return _media(node)


_BLOCK_RENDERERS: dict[str, Callable[[Mapping[str, Any], int], str]] = {
    "paragraph": _paragraph,
    "heading": _heading,
    "bulletList": _list,
    "orderedList": _list,
    "taskList": _task_list,
    "decisionList": _task_list,
    "codeBlock": _code_block,
    "blockquote": _quote,
    "rule": _rule,
    "table": _table,
    "mediaSingle": _media_group,
    "mediaGroup": _media_group,
    "media": _media_node,
    "blockCard": _card,
    "embedCard": _card,
    "expand": _expand,
    "nestedExpand": _expand,
}
