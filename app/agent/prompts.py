"""The prompts of the agent phases: implement, continue after a crash, fix, review, and the rules."""

from __future__ import annotations

from pathlib import Path

from app.models import Ticket

DIFF_LIMIT = 100_000
REVIEW_FORMAT = """Answer in exactly this format, at the end of your reply:

HAS_ISSUES: true|false
FINDINGS:
- <one finding per line: file, what is wrong, what to do>  (write "- none" when HAS_ISSUES is false)"""


def _ticket_block(ticket: Ticket) -> str:
    lines = [f"Ticket {ticket.key}: {ticket.summary}"]
    if ticket.issue_type:
        lines.append(f"Type: {ticket.issue_type}")
    if ticket.url:
        lines.append(f"Link: {ticket.url}")
    description = ticket.description.strip() or "(no description)"
    return "\n".join(lines) + f"\n\nDescription:\n{description}"


def system_rules(worktree: Path, read_only: bool, claude_md: str = "") -> str:
    """The service's rules, appended to the Claude Code preset."""
    rules = [
        "You are working for auto-code, an automated service that turns Jira tickets into pull requests.",
        f"Work only inside the repository at {worktree}; never read or write outside it.",
        "Do not commit, push, create branches or change git configuration: the service does that.",
        "Do not try to reach the network except through the project's own package manager.",
        "Commands are checked by a policy; when one is denied, do not try to get around it.",
    ]
    if read_only:
        rules.append("This is a review: read and run read-only commands only; change no file.")
    else:
        rules.append("When you are done, say in a few sentences what you changed and why.")
    text = "\n".join(f"- {rule}" for rule in rules)
    if claude_md.strip():
        text += f"\n\nThe repository's CLAUDE.md says:\n{claude_md.strip()}"
    return text


def implement(ticket: Ticket, worktree: Path) -> str:
    """The first prompt of the implementation session."""
    return (
        f"Implement this Jira ticket in the repository in the current directory ({worktree}).\n\n"
        f"{_ticket_block(ticket)}\n\n"
        "Make the smallest complete change that does what the ticket asks, following the code's existing "
        "style. Add or update tests where the project has them. Run the project's linter and tests if you "
        "can. Finish with a short summary of what you changed."
    )


def continue_prompt(ticket: Ticket) -> str:
    """Sent when the implementation session is resumed after the service was interrupted."""
    return (
        f"The service was interrupted while you were implementing {ticket.key}. Look at what is already "
        "done in the working tree, finish the implementation, and end with a short summary of all changes."
    )


def fix(feedback: str) -> str:
    """A fix round on the resumed implementation session."""
    return (
        "Your change needs another round. Fix the following, keeping everything the ticket asked for. "
        "Change only what is needed, then summarise what you fixed.\n\n" + feedback
    )


def review(ticket: Ticket, diff: str) -> str:
    """The prompt of the fresh, read-only review session."""
    if len(diff) > DIFF_LIMIT:
        diff = diff[:DIFF_LIMIT] + f"\n[... diff cut at {DIFF_LIMIT} characters; read the files for the rest]"
    return (
        "Review this uncommitted change made for a Jira ticket. Look for bugs, missing pieces of the "
        "ticket, broken or missing tests, and security problems. Ignore matters of taste. You may read "
        "files and run read-only commands.\n\n"
        f"{_ticket_block(ticket)}\n\nThe diff:\n```diff\n{diff}\n```\n\n{REVIEW_FORMAT}"
    )
