"""The agent's command and tool policy (a PreToolUse hook) and the scrubbed environment of its CLI.

Read it in the order a tool call meets it: policy.py (the entry point: tools, the hook), bash.py (the
Bash check's walk over the tree), words.py and options.py (a command line and a command's options as
bash and the command read them), commands.py (which names run, in which family), the rules per
command (file_commands.py with sed_awk.py, git.py, shell_builtins.py, wrappers.py, toolchains.py),
paths.py (where a path may be) and environment.py (what the agent's CLI may see). A rule that cannot
tell what a command would do denies it; denial.py carries the reason.
"""

from app.agent.guard.commands import ALWAYS_DENIED_COMMANDS, DEFAULT_ALLOWED_COMMANDS
from app.agent.guard.environment import agent_environment, is_denied_env_name
from app.agent.guard.paths import is_ci_config_path
from app.agent.guard.policy import (
    AgentPolicy,
    Decision,
    PolicyConfig,
    hook_matchers,
    pre_tool_use_hook,
)

__all__ = [
    "ALWAYS_DENIED_COMMANDS",
    "DEFAULT_ALLOWED_COMMANDS",
    "AgentPolicy",
    "Decision",
    "PolicyConfig",
    "agent_environment",
    "hook_matchers",
    "is_ci_config_path",
    "is_denied_env_name",
    "pre_tool_use_hook",
]
