"""The policy's entry point: every tool call of the agent allowed or denied, as a PreToolUse hook.

It decides the tools: file tools (Read, Write, Edit, Glob, ...) by the paths they name, Bash by the
Bash check, tools the policy does not know and those that reach the network or start sub-agents
(WebFetch, Task, ...) denied. A check that raises denies the call (the policy fails closed) and every
denial is handed to the caller's `on_denial`. It trusts the Bash check and paths.py for the rules, and
claude-agent-sdk to send each tool call to the hook before it runs (a hook that fails blocks the call).

What the policy is not: toolchains (python, node, make, npm scripts, ...) run code the agent wrote, and
package managers download from the network; the policy lets them run by design and cannot see what they
do. Process isolation and the network fence are the boundary for that code, and the commit step
re-checks the diff for CI configuration (`is_ci_config_path`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import tree_sitter_bash
from claude_agent_sdk import HookCallback, HookContext, HookInput, HookJSONOutput, HookMatcher
from claude_agent_sdk.types import HookEvent
from tree_sitter import Language, Parser

from app.agent.guard.bash import BashCheck
from app.agent.guard.commands import ALWAYS_DENIED_COMMANDS, SHELLS
from app.agent.guard.denial import Denied, shorten
from app.agent.guard.paths import PathCheck, Worktree
from app.errors import ConfigError
from app.logger import get_logger

log = get_logger(__name__)

MAX_COMMAND_LENGTH = 100_000
READ_TOOLS = frozenset({"Read", "Glob", "Grep", "LS"})
WRITE_TOOLS = frozenset({"Write", "Edit", "MultiEdit"})
PATHLESS_TOOLS = frozenset({"TodoWrite", "TaskCreate", "TaskUpdate", "TaskList", "TaskGet"})
DENIED_TOOLS = frozenset({"WebFetch", "WebSearch", "NotebookEdit", "Task", "Agent"})
_PATH_KEYS = ("file_path", "path", "notebook_path")


@dataclass(frozen=True)
class Decision:
    """The policy's answer; for a denial `reason` names the command or path and the rule."""

    allowed: bool
    reason: str


@dataclass(frozen=True)
class PolicyConfig:
    """What the policy needs to know: the worktree, the settings that widen it, and read-only sessions.

    `read_only` (a review session) also denies every write and everything that runs project code:
    toolchains, project scripts and `source`.
    """

    worktree: Path
    extra_allowed_commands: frozenset[str] = frozenset()
    allow_ci_config_writes: bool = False
    read_only: bool = False


class AgentPolicy:
    """Decides every tool call of the agent: file tools by path, Bash by parsing the command."""

    def __init__(self, config: PolicyConfig) -> None:
        for name in config.extra_allowed_commands:
            if not name or "/" in name or any(c.isspace() for c in name):
                raise ConfigError(f"AGENT_ALLOWED_COMMANDS: {name!r} is not a command name")
            if name in ALWAYS_DENIED_COMMANDS or name in ("eval", *SHELLS):
                raise ConfigError(f"AGENT_ALLOWED_COMMANDS: {name} cannot be allowed")
        self.config = config
        self.worktree = Worktree(config.worktree, config.allow_ci_config_writes)
        self.extra_commands = config.extra_allowed_commands
        self._language = Language(tree_sitter_bash.language())

    def parser(self) -> Parser:
        """A fresh parser (cheap; parsers are not shared between concurrent checks)."""
        return Parser(self._language)

    def check_bash(
        self, command: str, *, run_in_background: bool = False, cwd: Path | None = None
    ) -> Decision:
        """Allow or deny one Bash tool call; relative paths resolve against `cwd` (default: the worktree)."""
        if run_in_background:
            return Decision(False, "Bash run_in_background: background commands are not allowed")
        if not isinstance(command, str) or not command.strip():
            return Decision(False, "Bash: an empty command")
        if len(command) > MAX_COMMAND_LENGTH:
            return Decision(False, f"Bash: a command longer than {MAX_COMMAND_LENGTH} characters")
        try:
            paths = PathCheck(self.worktree, self._bases(cwd), read_only=self.config.read_only)
            BashCheck(self.parser, paths, self.extra_commands).source(command)
        except Denied as denied:
            return Decision(False, f"Bash command denied: {denied.reason}")
        except RecursionError:
            return Decision(False, "Bash command denied: nested too deeply to check")
        except Exception as error:  # a bug in the policy fails closed: the command does not run
            log.exception("bash policy check raised", error=type(error).__name__)
            return Decision(False, f"Bash command denied: internal policy error: {shorten(repr(error))}")
        return Decision(True, "allowed by the command policy")

    def _bases(self, cwd: Path | None) -> list[str]:
        if cwd is None:
            return [self.worktree.root]
        resolved = os.path.realpath(cwd)
        if not self.worktree.inside(resolved):
            raise Denied(f"the shell's working directory {shorten(str(cwd))} is outside the worktree")
        return [resolved]

    def check_tool(
        self, tool_name: str, tool_input: Mapping[str, Any], *, cwd: Path | None = None
    ) -> Decision:
        """Allow or deny one tool call of any kind (Bash included), relative paths against `cwd`."""
        try:
            return self._check_tool(tool_name, tool_input, cwd)
        except Denied as denied:
            return Decision(False, denied.reason)

    def _check_tool(self, tool_name: str, tool_input: Mapping[str, Any], cwd: Path | None) -> Decision:
        if tool_name == "Bash":
            if tool_input.get("dangerouslyDisableSandbox"):
                return Decision(False, "Bash dangerouslyDisableSandbox: disabling the sandbox is not allowed")
            command = tool_input.get("command")
            if not isinstance(command, str):
                return Decision(False, "Bash: the command is missing or not a string")
            return self.check_bash(
                command,
                run_in_background=bool(tool_input.get("run_in_background")),
                cwd=cwd,
            )
        if tool_name in DENIED_TOOLS:
            return Decision(False, f"{tool_name}: this tool is denied to the agent by default")
        if tool_name in PATHLESS_TOOLS:
            return Decision(True, f"{tool_name} touches no files")
        if tool_name not in READ_TOOLS and tool_name not in WRITE_TOOLS:
            return Decision(False, f"{tool_name}: not a tool the policy knows; unknown tools are denied")
        write = tool_name in WRITE_TOOLS
        if write and self.config.read_only:
            return Decision(False, f"{tool_name}: this session is read-only")
        base = self._bases(cwd)[0]
        for key in _PATH_KEYS:
            if key not in tool_input or (tool_input[key] is None and key == "path"):
                continue
            value = tool_input[key]
            if not isinstance(value, str) or not value:
                return Decision(False, f"{tool_name}: {key} must be a non-empty string")
            problem = self.worktree.problem(base, value, write=write)
            if problem:
                return Decision(False, f"{tool_name} {key}: {problem}")
        if write and not any(isinstance(tool_input.get(k), str) for k in _PATH_KEYS):
            return Decision(False, f"{tool_name}: no file_path given")
        pattern = tool_input.get("pattern")
        if tool_name == "Glob" and isinstance(pattern, str):
            if ".." in PurePosixPath(pattern).parts:
                return Decision(False, f"Glob pattern {shorten(pattern)}: patterns may not climb out with ..")
            if pattern.startswith(("/", "~")):
                fixed = re.split(r"[*?\[{]", pattern, maxsplit=1)[0]
                problem = self.worktree.problem(base, fixed.rsplit("/", 1)[0] or "/", write=False)
                if problem:
                    return Decision(False, f"Glob pattern: {problem}")
        return Decision(True, f"{tool_name} within the worktree")


def _hook_output(decision: Decision) -> HookJSONOutput:
    return {
        "hookSpecificOutput": {
            "hookEventName": "PreToolUse",
            "permissionDecision": "allow" if decision.allowed else "deny",
            "permissionDecisionReason": decision.reason,
        }
    }


def pre_tool_use_hook(
    policy: AgentPolicy, on_denial: Callable[[str, Mapping[str, Any], str], None]
) -> HookCallback:
    """A PreToolUse hook callback answering allow/deny from `policy`; every denial goes to `on_denial`."""

    async def hook(input_data: HookInput, tool_use_id: str | None, context: HookContext) -> HookJSONOutput:
        if input_data["hook_event_name"] != "PreToolUse":
            return {}
        tool_name = str(input_data.get("tool_name", ""))
        raw_input = input_data.get("tool_input")
        tool_input: Mapping[str, Any] = raw_input if isinstance(raw_input, Mapping) else {}
        cwd = input_data.get("cwd")
        try:
            decision = policy.check_tool(tool_name, tool_input, cwd=Path(cwd) if cwd else None)
        except Exception:
            log.exception("policy check failed", tool=tool_name, tool_use_id=tool_use_id)
            decision = Decision(False, f"{tool_name}: the policy check failed, so the call is denied")
        if not decision.allowed:
            try:
                on_denial(tool_name, tool_input, decision.reason)
            except Exception:
                log.exception("recording a policy denial failed", tool=tool_name, tool_use_id=tool_use_id)
        return _hook_output(decision)

    return hook


def hook_matchers(
    policy: AgentPolicy, on_denial: Callable[[str, Mapping[str, Any], str], None]
) -> dict[HookEvent, list[HookMatcher]]:
    """`ClaudeAgentOptions(hooks=...)`: the policy for every tool; a hook that fails blocks the call."""
    hook = pre_tool_use_hook(policy, on_denial)
    return {"PreToolUse": [HookMatcher(matcher=None, hooks=[hook], on_failure="block")]}
