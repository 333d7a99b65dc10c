"""Domain records shared by the HTTP edge, the runner and its collaborators."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

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


class RunState(StrEnum):
    """Where a run is; all but the first two are final.

    PUSHED is for a repository with no forge configured (REPO_DIR, or no GitHub repository): the branch
    is pushed and there is no PR to open.
    """

    QUEUED = "queued"
    RUNNING = "running"
    PR_OPENED = "pr_opened"
    PUSHED = "pushed"
    NO_CHANGES = "no_changes"
    DRY_RUN = "dry_run"
    FAILED = "failed"
    CANCELLED = "cancelled"
    QUARANTINED = "quarantined"  # a decoy credential left the sandbox or it rewrote trusted git files


class StepName(StrEnum):
    """The pipeline's steps, in order. Renaming one changes the durable workflow: see workflow.py."""

    PREPARE_WORKSPACE = "prepare_workspace"
    SETUP = "setup"
    IMPLEMENT = "implement"
    REVIEW = "review"
    LINT = "lint"
    TEST = "test"
    BASELINE = "baseline"
    FIX = "fix"
    COMMIT = "commit"
    PUSH = "push"
    OPEN_PR = "open_pr"
    REPORT = "report"


class Gate(StrEnum):
    """A check the change must pass before the PR opens, in the order they run."""

    REVIEW = "review"
    LINT = "lint"
    TEST = "test"


class PipelineOptions(BaseModel):
    """The run's switches, fixed when the ticket is accepted so a recovered run behaves the same."""

    dry_run: bool = False
    run_review: bool = True
    run_lint: bool = True
    run_tests: bool = True
    max_fix_rounds: int = 2
    max_budget_usd: float = 5.0
    open_pr: bool = True
    run_setup: bool = False  # SETUP_COMMAND is set: run it after prepare and in each baseline checkout

    def gates(self) -> list[Gate]:
        """The enabled gates, in order."""
        enabled = {Gate.REVIEW: self.run_review, Gate.LINT: self.run_lint, Gate.TEST: self.run_tests}
        return [gate for gate in Gate if enabled[gate]]


AgentOutcome = Literal["success", "max_turns", "budget", "api_error", "timeout", "cli_missing", "crashed"]


class AgentResult(BaseModel):
    """How one agent phase ended, with what it cost."""

    session_id: str
    outcome: AgentOutcome
    reason: str = ""
    turns: int = 0
    cost_usd: float = 0.0
    usage: dict[str, int] = Field(default_factory=dict)
    summary: str = ""
    denials: list[str] = Field(default_factory=list)
    # What the phase's sandbox asked of the egress proxy, and the decoys it saw leave (empty: none).
    network: list[dict[str, Any]] = Field(default_factory=list)
    canaries: list[str] = Field(default_factory=list)
    fenced: bool = False

    @property
    def ok(self) -> bool:
        return self.outcome == "success"


ReviewVerdict = Literal["passed", "has_issues", "inconclusive"]


class ReviewResult(BaseModel):
    """The read-only review of a diff: a verdict, the findings, and the session that made them."""

    verdict: ReviewVerdict
    findings: str = ""
    agent: AgentResult


CheckStatus = Literal["passed", "failed", "skipped", "error"]


class CheckResult(BaseModel):
    """One run of the target repo's lint or test command."""

    gate: Gate | None  # None: the setup command
    status: CheckStatus
    command: list[str] = Field(default_factory=list)
    output: str = ""
    duration: float = 0.0
    reason: str = ""
    network: list[dict[str, Any]] = Field(default_factory=list)
    canaries: list[str] = Field(default_factory=list)
    fenced: bool = False


# --- how a run ended, as the ticket, the PR, the CLI and the API show it ------------------------------


def network_line(records: list[dict[str, Any]], fenced: bool | None) -> str:
    """One line for a person: was the run fenced, how many requests went out, which were denied."""
    if fenced is None:
        return ""
    if not fenced:
        return "Network: UNFENCED (no network namespace here): code the agent ran could reach any host"
    allowed = sum(1 for record in records if record.get("allowed"))
    hosts = sorted({f"{r.get('host')}:{r.get('port')}" for r in records if r.get("allowed")})
    line = f"Network: fenced; {allowed} request{'s' if allowed != 1 else ''} through the egress proxy"
    line += f" ({', '.join(hosts[:5])})" if hosts else ""
    denied = denied_summary(records)
    return f"{line}; {denied}" if denied else line


def denied_summary(records: list[dict[str, Any]], limit: int = 5) -> str:
    """ "3 connections denied: host:port (rule), ..." or "" when none was."""
    denied = [record for record in records if not record.get("allowed")]
    if not denied:
        return ""
    seen = list(
        dict.fromkeys(f"{r.get('host')}:{r.get('port')} ({r.get('rule')}, {r.get('phase')})" for r in denied)
    )
    more = f", and {len(seen) - limit} more" if len(seen) > limit else ""
    noun = "connection" if len(denied) == 1 else "connections"
    return f"{len(denied)} {noun} denied: {', '.join(seen[:limit])}{more}"


class GateReport(BaseModel):
    """The last result of one gate, as the PR body and the run record show it."""

    gate: Gate
    status: str
    detail: str = ""
    rounds: int = 0
    preexisting: str = ""


class RunResult(BaseModel):
    """How a run ended: the state and everything a person needs to see about it."""

    run_id: str
    ticket: str
    state: RunState
    reason: str = ""
    failed_step: StepName | None = None
    session_id: str | None = None
    branch: str | None = None
    base_branch: str | None = None
    worktree: str | None = None
    removal_hint: str | None = None
    pr_url: str | None = None
    commit: str | None = None
    files: list[str] = Field(default_factory=list)
    insertions: int = 0
    deletions: int = 0
    skipped_files: list[str] = Field(default_factory=list)
    summary: str = ""
    review_findings: list[str] = Field(default_factory=list)
    gates: list[GateReport] = Field(default_factory=list)
    turns: int = 0
    cost_usd: float = 0.0
    denials: list[str] = Field(default_factory=list)
    # Every request the run's sandboxes made through the egress proxy; fenced: they had no other way out.
    network: list[dict[str, Any]] = Field(default_factory=list)
    fenced: bool | None = None
    # Where a decoy credential was seen ("egress proxy, test phase: aws secret access key", ...).
    evidence: list[str] = Field(default_factory=list)
    retry_of: str | None = None

    def network_summary(self) -> str:
        """One line: fenced or not, the requests made, the connections denied ("" before any phase ran)."""
        return network_line(self.network, self.fenced)
