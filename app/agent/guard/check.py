"""The port a command's rule is handed when it must go back to the Bash check: `Check`.

It decides nothing. Rules for commands that run other commands or shell code (wrappers, shells,
toolchain runners) ask the check that reached them to check the inner command, and trust it to apply
every rule to that command as to one written out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from app.agent.guard.commands import Via
from app.agent.guard.paths import PathCheck
from app.agent.guard.words import Word


class Check(Protocol):
    """What a rule may ask of the Bash check that reached the command."""

    paths: PathCheck

    def argv(self, argv: Sequence[Word], via: Via) -> None:
        """Check an inner command given as words, reached through `via`."""

    def nested(self, text: str) -> None:
        """Check shell code given as a string (`bash -c`), one level deeper."""

    def runs_project_code(self, what: str) -> None:
        """Deny `what`, which runs project code, in a read-only session."""
