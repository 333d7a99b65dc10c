"""The environment that points the bundled Claude Code CLI at a local scripted model server."""

from __future__ import annotations

from pathlib import Path


def agent_env(
    base_url: str,
    home: Path,
    *,
    max_retries: int | None = None,
    api_timeout_ms: int | None = None,
) -> dict[str, str]:
    """Variables for `ClaudeAgentOptions(env=...)`: local API, dummy key, no extra traffic, config in `home`.

    `home` becomes HOME and holds CLAUDE_CONFIG_DIR, so sessions and settings stay out of `~/.claude`.
    `max_retries` and `api_timeout_ms` bound the CLI's retries for fault tests.
    """
    config_dir = home / ".claude"
    config_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": "dummy",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "HOME": str(home),
        "CLAUDE_CONFIG_DIR": str(config_dir),
    }
    if max_retries is not None:
        env["CLAUDE_CODE_MAX_RETRIES"] = str(max_retries)
    if api_timeout_ms is not None:
        env["API_TIMEOUT_MS"] = str(api_timeout_ms)
    return env
