"""How a check says no: `Denied` carries a denying Decision's reason, `shorten` quotes a command in it.

It decides nothing and trusts nothing; every other module of the guard raises through it.
"""

from __future__ import annotations


class Denied(Exception):
    """Raised inside a check; becomes a denying Decision."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def shorten(text: str, limit: int = 80) -> str:
    """`text` on one line, cut to `limit` characters with an ellipsis, for quoting in a reason."""
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 1] + "…"
