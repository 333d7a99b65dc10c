"""Jira webhook bodies of every shape turned into a Ticket, or a readable reason to ignore them."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
from pydantic import ValidationError

from app.errors import InvalidTicket
from app.logger import get_logger
from app.models import Ticket, normalise_key

if TYPE_CHECKING:
    from app.services.runner import RunResult

log = get_logger(__name__)

MAX_SUMMARY_CHARS = 1000
MAX_DESCRIPTION_CHARS = 100_000
MAX_ADF_DEPTH = 100
MAX_URL_CHARS = 2000
TRUNCATED_MARK = "\n\n[description truncated]"

ISSUE_CREATED = "jira:issue_created"
ISSUE_UPDATED = "jira:issue_updated"
EVENT_AUTOMATION = "automation"
EVENT_CUSTOM = "custom"

_KEY_FIELDS = ("key", "issueKey", "issue_key")
_URL_FIELDS = ("url", "browseUrl", "browse_url")
_SURROGATES = re.compile("[\ud800-\udfff]")
_PRINTABLE_EVENT = re.compile(r"[\w:.\-]{1,80}")
_UNSAFE_URL_CHARS = re.compile(r"[\s\x00-\x1f\x7f<>\"'`]")


@dataclass(frozen=True)
class TriggerRules:
    """Which tickets start a run: a label (compared case-insensitively) and a set of project keys."""

    trigger_label: str | None = None
    projects: frozenset[str] = frozenset()  # upper-case project keys; empty = every project


@dataclass(frozen=True)
class Accepted:
    """A body that starts a run for `ticket`; `event` names the kind of body it came in."""

    ticket: Ticket
    event: str


@dataclass(frozen=True)
class Ignored:
    """A well-formed body that does not start a run, and why."""

    reason: str


def interpret(body: object, rules: TriggerRules) -> Accepted | Ignored:
    """Classify a parsed webhook body; raise InvalidTicket naming every problem of a triggering body."""
    if not isinstance(body, dict):
        raise InvalidTicket(["body must be a JSON object"])
    if "webhookEvent" in body:
        classified = _classify_native(body, rules)
        if isinstance(classified, Ignored):
            return classified
        event = classified
        issue: object = body.get("issue")
        prefix = "issue."
        if not isinstance(issue, dict):
            raise InvalidTicket(["issue is missing" if issue is None else "issue must be an object"])
    elif "issue" in body:
        issue, prefix = body["issue"], "issue."
        if not isinstance(issue, dict):
            raise InvalidTicket(["issue must be an object"])
        event = _automation_or_custom(issue)
    elif _looks_like_issue(body):
        issue, prefix = body, ""
        event = _automation_or_custom(issue)
    else:
        raise InvalidTicket(["issue is missing (expected issue.key and issue.fields.summary)"])

    ticket = _build_ticket(issue, prefix)

    allowed = {p.upper() for p in rules.projects}
    # Both the project field and the key's own prefix must be allowed: the key is what names branches.
    if allowed and not {ticket.project.upper(), ticket.key.rsplit("-", 1)[0]} <= allowed:
        return Ignored(f"project {ticket.project} of {ticket.key} is not one of the configured projects")
    if rules.trigger_label and event != ISSUE_UPDATED and not _has_label(ticket.labels, rules.trigger_label):
        return Ignored(f"{ticket.key} does not carry the trigger label {rules.trigger_label!r}")
    return Accepted(ticket=ticket, event=event)


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


# --- event classification ---------------------------------------------------------------------------


def _classify_native(body: Mapping[str, Any], rules: TriggerRules) -> str | Ignored:
    """The native event name when it starts a run, else the reason it does not."""
    event = body.get("webhookEvent")
    if not isinstance(event, str):
        raise InvalidTicket(["webhookEvent must be a string"])
    shown = _show_event(event)
    if event == ISSUE_CREATED:
        return event
    if event != ISSUE_UPDATED:
        return Ignored(f"event {shown} does not start a run")
    if not rules.trigger_label:
        return Ignored(
            f"event {shown} starts a run only when the trigger label is added, and no trigger label is set"
        )
    if _label_added(body.get("changelog"), rules.trigger_label):
        return event
    return Ignored(f"event {shown} did not add the trigger label {rules.trigger_label!r}")


def _label_added(changelog: object, label: str) -> bool:
    """Whether a changelog item on the labels field added `label`."""
    items = changelog.get("items") if isinstance(changelog, Mapping) else None
    if not isinstance(items, list):
        return False
    for item in items:
        if not isinstance(item, Mapping):
            continue
        field = item.get("field")
        if not isinstance(field, str) or field.casefold() != "labels":
            continue
        before, after = _label_words(item.get("fromString")), _label_words(item.get("toString"))
        if _has_label(after, label) and not _has_label(before, label):
            return True
    return False


def _label_words(value: object) -> list[str]:
    return value.split() if isinstance(value, str) else []


def _has_label(labels: Sequence[str], label: str) -> bool:
    wanted = label.casefold()
    return any(candidate.casefold() == wanted for candidate in labels)


def _show_event(event: str) -> str:
    """The event name fit for a log line or an HTTP answer (it comes from the caller)."""
    return event if _PRINTABLE_EVENT.fullmatch(event) else repr(event[:80])


def _looks_like_issue(body: Mapping[str, Any]) -> bool:
    return any(name in body for name in (*_KEY_FIELDS, "fields", "summary"))


def _automation_or_custom(issue: Mapping[str, Any]) -> str:
    """Automation's own bodies carry the REST shape: fields plus an id or self link."""
    if isinstance(issue.get("fields"), dict) and ("id" in issue or "self" in issue):
        return EVENT_AUTOMATION
    return EVENT_CUSTOM


# --- ticket validation ------------------------------------------------------------------------------


def _build_ticket(issue: Mapping[str, Any], prefix: str) -> Ticket:
    """Validate the issue object and build the Ticket, collecting every problem before raising."""
    problems: list[str] = []
    key = _key(issue, prefix, problems)
    raw_fields = issue.get("fields")
    fields: Mapping[str, Any] = {}
    if isinstance(raw_fields, dict):
        fields = raw_fields
    elif raw_fields is not None:
        problems.append(f"{prefix}fields must be an object")

    def pick(name: str) -> tuple[str, object]:
        """The path and value of a field: under fields first, else flat on the issue (custom bodies)."""
        if name in fields:
            return f"{prefix}fields.{name}", fields[name]
        if name in issue:
            return f"{prefix}{name}", issue[name]
        return f"{prefix}fields.{name}", None

    summary = _summary(*pick("summary"), problems, flat=raw_fields is None and prefix == "")
    description = _description(*pick("description"), problems)
    labels = _labels(*pick("labels"), problems)
    project = _project(*pick("project"), problems)
    if problems or key is None or summary is None:
        raise InvalidTicket(problems)
    try:
        return Ticket(
            key=key,
            summary=summary,
            description=description,
            url=_browse_url(issue, key),
            project=project or key.rsplit("-", 1)[0],
            labels=labels,
            issue_type=_name_of(pick("issuetype")[1]),
            reporter=_person(pick("reporter")[1]),
        )
    except ValidationError as error:  # a backstop: the checks above should leave nothing for pydantic
        raise InvalidTicket(
            [f"{prefix}{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()]
        ) from None


def _key(issue: Mapping[str, Any], prefix: str, problems: list[str]) -> str | None:
    name = next((n for n in _KEY_FIELDS if n in issue), "key")
    value = issue.get(name)
    path = f"{prefix}{name}"
    if value is None:
        problems.append(f"{path} is missing")
        return None
    if not isinstance(value, str):
        problems.append(f"{path} must be a string")
        return None
    try:
        return normalise_key(value)
    except ValueError as error:
        problems.append(f"issue key {path}: {error}")
        return None


def _summary(path: str, value: object, problems: list[str], *, flat: bool) -> str | None:
    if flat and value is None:
        path = path.replace("fields.", "", 1)  # {"key": ..., "summary": ...} bodies have no fields
    if value is None:
        problems.append(f"{path} is missing")
        return None
    if not isinstance(value, str):
        problems.append(f"{path} must be a string")
        return None
    summary = _clean(value).strip()[:MAX_SUMMARY_CHARS].strip()
    if not summary:
        problems.append(f"{path} is empty")
        return None
    return summary


def _description(path: str, value: object, problems: list[str]) -> str:
    if value is not None and not isinstance(value, str | dict):
        problems.append(f"{path} must be a string or an ADF document")
        return ""
    text = _clean(description_text(value))
    if len(text) > MAX_DESCRIPTION_CHARS:
        text = text[:MAX_DESCRIPTION_CHARS] + TRUNCATED_MARK
    return text


def _labels(path: str, value: object, problems: list[str]) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(label, str) for label in value):
        problems.append(f"{path} must be a list of strings")
        return ()
    return tuple(_clean(label).strip() for label in value if label.strip())


def _project(path: str, value: object, problems: list[str]) -> str | None:
    """The project key: fields.project.key (or a plain string in custom bodies), else None."""
    if value is None:
        return None
    if isinstance(value, dict):
        path, value = f"{path}.key", value.get("key")
        if value is None:
            return None
    if not isinstance(value, str):
        problems.append(f"{path} must be a string")
        return None
    try:
        # The project part of a full key follows the same rule, so check it through normalise_key.
        return normalise_key(f"{value}-1").rsplit("-", 1)[0]
    except ValueError:
        problems.append(f"{path} is not a Jira project key like PROJ: {value[:60]!r}")
        return None


def _browse_url(issue: Mapping[str, Any], key: str) -> str | None:
    """An explicit url/browseUrl of a custom body, else <site>/browse/<KEY> derived from issue.self."""
    for name in _URL_FIELDS:
        url = _http_url(issue.get(name))
        if url:
            return url
    self_link = _http_url(issue.get("self"))
    if self_link is None:
        return None
    parts = urlsplit(self_link)
    site_path = parts.path.split("/rest/", 1)[0] if "/rest/" in parts.path else ""
    return f"{parts.scheme}://{parts.netloc}{site_path.rstrip('/')}/browse/{key}"


def _http_url(value: object) -> str | None:
    if not isinstance(value, str) or len(value) > MAX_URL_CHARS or _UNSAFE_URL_CHARS.search(value):
        return None
    try:
        parts = urlsplit(value)
        # A link with user:password@ in it is refused: it would put a credential on a PR page.
        usable = (
            parts.scheme.lower() in {"http", "https"} and bool(parts.hostname) and "@" not in parts.netloc
        )
    except ValueError:
        return None
    return value if usable else None


def _name_of(value: object) -> str | None:
    if isinstance(value, Mapping):
        value = value.get("name")
    return (_clean(value).strip() or None) if isinstance(value, str) else None


def _person(value: object) -> str | None:
    """Cloud users have displayName/accountId; Server and Data Center users have name/key."""
    if isinstance(value, str):
        return _clean(value).strip() or None
    if not isinstance(value, Mapping):
        return None
    for name in ("displayName", "name", "emailAddress", "key", "accountId"):
        found = value.get(name)
        if isinstance(found, str) and found.strip():
            return _clean(found).strip()
    return None


def _clean(text: str) -> str:
    """Replace lone surrogates (json.loads lets "\\ud800" through) so the text can be encoded."""
    return _SURROGATES.sub("\ufffd", text)


# --- Atlassian Document Format ----------------------------------------------------------------------

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


# --- report-back: a comment on the ticket when a run ends -----------------------------------------

COMMENT_LIMIT = 30_000


def comment_text(result: RunResult) -> str:
    """The plain-text comment that tells the ticket how its run ended."""
    lines = [f"auto-code run {result.run_id}: {result.state.value.replace('_', ' ')}"]
    if result.pr_url:
        lines.append(f"Pull request: {result.pr_url}")
    if result.failed_step:
        lines.append(f"Failed at: {result.failed_step.value}")
    if result.reason:
        lines.append(f"Reason: {result.reason}")
    if result.removal_hint:
        lines.append(f"Worktree kept for inspection; remove it with: {result.removal_hint}")
    if result.summary:
        lines.append(f"\nWhat the agent did:\n{result.summary}")
    if result.evidence:
        lines.append("Evidence: " + "; ".join(result.evidence))
    lines.append(f"\nTurns: {result.turns}, cost: ${result.cost_usd:.2f}")
    if result.network_summary():
        lines.append(result.network_summary())
    return "\n".join(lines)[:COMMENT_LIMIT]


class JiraReporter:
    """Posts the run's outcome as a comment on the ticket (REST v2, plain text, basic auth)."""

    def __init__(self, client: httpx.AsyncClient, base_url: str, email: str, token: str) -> None:
        self._client = client
        self._base_url = base_url.rstrip("/")
        self._auth = httpx.BasicAuth(email, token)

    async def report(self, ticket: Ticket, result: RunResult) -> None:
        """Comment on the ticket; raise on failure so the caller can log it."""
        url = f"{self._base_url}/rest/api/2/issue/{ticket.key}/comment"
        response = await self._client.post(
            url, json={"body": comment_text(result)}, auth=self._auth, timeout=30
        )
        if response.status_code >= 300:
            raise RuntimeError(f"Jira answered {response.status_code} to the comment: {response.text[:300]}")
        log.info("ticket commented", ticket=ticket.key, run_id=result.run_id)


class LogReporter:
    """Used when no Jira credentials are set: the outcome goes to the log only."""

    async def report(self, ticket: Ticket, result: RunResult) -> None:
        """Log the outcome that a Jira comment would carry."""
        log.info("run outcome (no Jira credentials set)", ticket=ticket.key, run_id=result.run_id)
