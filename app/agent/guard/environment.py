"""The agent CLI's environment: built from nothing, with no variable that could carry a secret.

It decides which names are secrets (`is_denied_env_name`: tokens, passwords, the service's own Jira,
Langfuse and database settings), dropped even when an operator passes them through, and which
Anthropic and Claude Code settings the CLI is given. It trusts the caller to start the CLI from a clean
environment, since the SDK merges `os.environ` into the one it is given.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

DENIED_ENV_NAMES = frozenset(
    {"GH_TOKEN", "GITHUB_TOKEN", "GH_ENTERPRISE_TOKEN", "GITHUB_ENTERPRISE_TOKEN", "WEBHOOK_SECRET",
     "API_TOKEN", "DATABASE_URL", "SSH_AUTH_SOCK", "GIT_ASKPASS", "SSH_ASKPASS"}
)  # fmt: skip
DENIED_ENV_PREFIXES = ("JIRA_", "LANGFUSE_", "DBOS_", "AWS_", "GOOGLE_APPLICATION_")
DENIED_ENV_PARTS = ("SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "PRIVATE_KEY")
DENIED_ENV_SUFFIXES = ("_TOKEN", "_API_KEY", "_ACCESS_KEY")
_AGENT_SETTING_PREFIXES = ("ANTHROPIC_", "CLAUDE_CODE_", "CLAUDE_AGENT_SDK_")
_AGENT_SETTINGS = frozenset(
    {"API_TIMEOUT_MS", "IS_SANDBOX", "DISABLE_TELEMETRY", "DISABLE_AUTOUPDATER", "DISABLE_ERROR_REPORTING",
     "MAX_THINKING_TOKENS", "BASH_DEFAULT_TIMEOUT_MS", "BASH_MAX_TIMEOUT_MS", "MCP_TIMEOUT"}
)  # fmt: skip


def is_denied_env_name(name: str) -> bool:
    """True for a variable that must never reach the agent (tokens, secrets, service credentials)."""
    upper = name.upper()
    return (
        upper in DENIED_ENV_NAMES
        or upper.startswith(DENIED_ENV_PREFIXES)
        or any(part in upper for part in DENIED_ENV_PARTS)
        or upper.endswith(DENIED_ENV_SUFFIXES)
    )


def agent_environment(
    *,
    home: Path,
    config_dir: Path,
    anthropic: Mapping[str, str],
    passthrough: Iterable[str],
    source: Mapping[str, str],
) -> dict[str, str]:
    """The whole environment of the agent's CLI, built from nothing rather than filtered from the service's.

    It holds PATH (a plain default when `source` has none), LANG and LC_ALL when `source` has them,
    HOME=`home`, CLAUDE_CONFIG_DIR=`config_dir`, the `anthropic` settings (names starting ANTHROPIC_,
    CLAUDE_CODE_ or CLAUDE_AGENT_SDK_, or a known CLI setting such as API_TIMEOUT_MS; anything else
    raises ValueError), and each `passthrough` name present in `source`, except a denied name
    (`is_denied_env_name`: GH_TOKEN, GITHUB_TOKEN, GH_ENTERPRISE_TOKEN, WEBHOOK_SECRET, API_TOKEN,
    DATABASE_URL, JIRA_*, LANGFUSE_*, DBOS_*, AWS_*, *SECRET*, *PASSWORD*, *CREDENTIAL*, *_TOKEN,
    *_API_KEY, ...), which is dropped even when passed through. The SDK merges `os.environ` into the
    CLI's environment, so the caller must start the CLI from a clean environment (e.g. an `env -i`
    wrapper as `cli_path`) for this to be the only environment it gets.
    """
    env = {"PATH": source.get("PATH") or "/usr/local/bin:/usr/bin:/bin"}
    for name in ("LANG", "LC_ALL"):
        if source.get(name):
            env[name] = source[name]
    for name in passthrough:
        if name in ("HOME", "CLAUDE_CONFIG_DIR") or is_denied_env_name(name) or name not in source:
            continue
        env[name] = source[name]
    for name, value in anthropic.items():
        if not (name.startswith(_AGENT_SETTING_PREFIXES) or name in _AGENT_SETTINGS):
            raise ValueError(f"{name} is not an Anthropic or Claude Code setting")
        env[name] = value
    env["HOME"] = str(home)
    env["CLAUDE_CONFIG_DIR"] = str(config_dir)
    return env
