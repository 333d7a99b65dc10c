"""Jira webhook bodies of every shape turned into a Ticket, or a readable reason to ignore them."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from app.errors import InvalidTicket
from app.intake.adf import description_text
from app.logger import get_logger
from app.models import Ticket, normalise_key

log = get_logger(__name__)

MAX_SUMMARY_CHARS = 1000
MAX_DESCRIPTION_CHARS = 100_000
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
