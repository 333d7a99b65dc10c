"""The service's exceptions, in one shallow hierarchy.

AutoCodeError
├── ConfigError          settings missing or invalid; raised once at startup
├── InvalidTicket        a webhook body without a usable ticket (HTTP 422)
├── CommandError         a subprocess exited non-zero; carries the redacted argv and its output tail
│   └── CommandTimeout   ... or ran past its timeout and was killed with its process group
├── WorkspaceError       git state the service cannot use or repair (path outside the workspace, ...)
│   ├── PushRejected     the remote refused the push (protection, rules, a lease that no longer holds)
│   └── SandboxTampered  sandboxed code rewrote what the host side trusts (the .git file, commondir)
├── GitHubError          gh could not find or create the pull request
├── RunNotFound          no run has that id (HTTP 404)
└── RunConflict          the run is not in a state that allows the action (HTTP 409)
"""

from __future__ import annotations

from collections.abc import Sequence


class AutoCodeError(Exception):
    """Base of every error the service raises on purpose."""


class ConfigError(AutoCodeError):
    """Settings are missing or invalid; the message names every offending variable."""


class InvalidTicket(AutoCodeError):
    """A webhook body that does not carry a usable ticket."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class CommandError(AutoCodeError):
    """A subprocess failed. `argv` is already redacted; `output` is the tail of stdout and stderr."""

    def __init__(self, argv: Sequence[str], returncode: int | None, output: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.output = output
        super().__init__(f"{' '.join(self.argv)} exited with {returncode}: {output[-2000:]}")


class CommandTimeout(CommandError):
    """A subprocess ran past its timeout; its whole process group was killed."""

    def __init__(self, argv: Sequence[str], timeout: float, output: str) -> None:
        self.timeout = timeout
        super().__init__(argv, None, output)
        self.args = (f"{' '.join(self.argv)} timed out after {timeout:g}s: {output[-2000:]}",)


class WorkspaceError(AutoCodeError):
    """The git workspace is in a state the service cannot use or repair."""


class PushRejected(WorkspaceError):
    """The remote refused the push; the message says why."""


class SandboxTampered(WorkspaceError):
    """Code that ran in the sandbox changed git files the service trusts; the run is quarantined."""


class GitHubError(AutoCodeError):
    """gh could not find or create the pull request."""


class RunNotFound(AutoCodeError):
    """No run has that id."""


class RunConflict(AutoCodeError):
    """The run's state does not allow the action (cancel a finished run, retry a running one)."""
