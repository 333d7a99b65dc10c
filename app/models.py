"""Domain records shared by the HTTP edge, the runner and its collaborators."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

# A Jira key: a project key (a letter, then letters, digits or underscores) and an issue number.
# It is the only thing branch names and paths are ever built from, so it is bounded and strict.
JIRA_KEY_PATTERN = re.compile(r"[A-Z][A-Z0-9_]{0,29}-[1-9][0-9]{0,9}")
MAX_KEY_LENGTH = 41


def normalise_key(value: str) -> str:
    """Return the upper-case Jira key, or raise ValueError saying what is wrong with it."""
    key = value.strip().upper()
    if len(key) > MAX_KEY_LENGTH or not JIRA_KEY_PATTERN.fullmatch(key):
        raise ValueError(f"not a Jira issue key like PROJ-123: {value[:60]!r}")
    return key


JiraKey = Annotated[str, AfterValidator(normalise_key)]


class Ticket(BaseModel):
    """A Jira issue as the pipeline needs it, whatever shape of webhook body it came in."""

    model_config = ConfigDict(frozen=True)

    key: JiraKey
    summary: str = Field(min_length=1, max_length=1000)
    description: str = ""
    url: str | None = None
    project: str
    labels: tuple[str, ...] = ()
    issue_type: str | None = None
    reporter: str | None = None


class Submission(BaseModel):
    """What the runner answers when a ticket is handed to it."""

    run_id: str
    duplicate: bool = False
