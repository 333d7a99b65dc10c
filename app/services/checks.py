"""The target repository's lint and test commands: found, run with a timeout, and compared with the base."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from app.errors import CommandError, CommandTimeout
from app.logger import get_logger
from app.models import CheckResult, Gate
from app.services import proc

log = get_logger(__name__)

OUTPUT_TAIL = 6000
# A line that names one failure, in the formats of common tools: pytest's short summary, jest/vitest,
# eslint/tsc/ruff/mypy/flake8 `path:line[:col]: message`, and ruff's `--> path:line:col` pointer.
_FAILURE_LINE = re.compile(
    r"^(?:FAILED|ERROR|FAIL)\s+\S+"
    r"|^\s*-->\s*\S+:\d+"
    r"|^[\w./\\-]+\.\w+[:(]\d+(?:[:,]\d+)?\)?:?\s+\S"
    r"|^\s*✕\s+\S"
)
_POSITION = re.compile(r"[:(]\d+(?:[:,]\d+)?\)?")

# Wraps argv so the command runs isolated (the sandbox); identity when isolation is off.
Wrapper = Callable[[Sequence[str], Path], list[str]]


def _no_wrapper(argv: Sequence[str], cwd: Path) -> list[str]:
    return list(argv)


@dataclass(frozen=True)
class ChecksConfig:
    """The configured commands (None = detect from the repository) and the limits."""

    lint_command: str | None = None
    test_command: str | None = None
    timeout: float = 900
    env: Mapping[str, str] = field(default_factory=dict)


def _package_scripts(repo: Path) -> dict[str, str]:
    try:
        scripts = json.loads((repo / "package.json").read_text()).get("scripts", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {str(k): str(v) for k, v in scripts.items()} if isinstance(scripts, dict) else {}


def _pyproject(repo: Path) -> dict[str, object]:
    try:
        return tomllib.loads((repo / "pyproject.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def _make_targets(repo: Path) -> set[str]:
    try:
        text = (repo / "Makefile").read_text()
    except OSError:
        return set()
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, flags=re.MULTILINE))


def detect_command(gate: Gate, repo: Path) -> list[str] | None:
    """Find the repository's own command for `gate`, or None when it has none."""
    name = "lint" if gate is Gate.LINT else "test"
    scripts = _package_scripts(repo)
    if name in scripts:
        if (repo / "pnpm-lock.yaml").exists():
            return ["pnpm", "run", name]
        if (repo / "yarn.lock").exists():
            return ["yarn", "run", name]
        return ["npm", "run", name]
    pyproject = _pyproject(repo)
    if pyproject:
        tools = pyproject.get("tool", {})
        tools = tools if isinstance(tools, dict) else {}
        text = json.dumps(pyproject)
        if gate is Gate.LINT and ("ruff" in tools or (repo / "ruff.toml").exists() or '"ruff' in text):
            return ["ruff", "check", "."]
        if gate is Gate.TEST and ("pytest" in tools or '"pytest' in text or (repo / "tests").is_dir()):
            return ["python", "-m", "pytest", "-q"]
    if name in _make_targets(repo):
        return ["make", name]
    return None


def failure_fingerprints(output: str) -> set[str]:
    """The lines of `output` that each name one failure, without line and column numbers."""
    return {_POSITION.sub("", line.strip()) for line in output.splitlines() if _FAILURE_LINE.search(line)}


def new_failures(current: CheckResult, baseline: CheckResult | None) -> str | None:
    """What of a failed check is new against the base commit, or None when all of it was already there.

    A baseline that passed (or was not run) makes every failure new. When both fail and neither output
    has lines naming single failures, the failure is taken as pre-existing: the agent is not asked to
    fix what the base branch already breaks.
    """
    if baseline is None or baseline.status != "failed":
        return current.output
    fresh = failure_fingerprints(current.output) - failure_fingerprints(baseline.output)
    if not fresh:
        return None
    listed = "\n".join(sorted(fresh))
    return f"New failures (not present on the base branch):\n{listed}\n\nOutput:\n{current.output}"


class Checks:
    """Runs the lint and test gates of the repository in a working copy."""

    def __init__(self, config: ChecksConfig, wrap: Wrapper | None = None) -> None:
        self._config = config
        self._wrap = wrap or _no_wrapper

    def command_for(self, gate: Gate, repo: Path) -> list[str] | None:
        """The configured command for `gate`, else the detected one."""
        configured = self._config.lint_command if gate is Gate.LINT else self._config.test_command
        if configured:
            return shlex.split(configured)
        return detect_command(gate, repo)

    async def run(self, gate: Gate, repo: Path) -> CheckResult:
        """Run `gate` in `repo`: passed, failed with the output's tail, or skipped when no command exists."""
        argv = self.command_for(gate, repo)
        if argv is None:
            log.info("check skipped: no command", gate=gate.value)
            return CheckResult(
                gate=gate, status="skipped", reason=f"no {gate.value} command configured or found"
            )
        if (
            shutil.which(argv[0], path=self._config.env.get("PATH")) is None
            and not (repo / argv[0]).is_file()
        ):
            # Not a failure of the change, nor of the base branch: the run cannot check at all.
            reason = f"{argv[0]} is not installed (not on the PATH of the {gate.value} command)"
            log.warning("check cannot run", gate=gate.value, command=argv[0])
            return CheckResult(gate=gate, status="error", command=argv, reason=reason)
        try:
            done = await proc.run(
                self._wrap(argv, repo),
                cwd=repo,
                env=self._config.env,
                timeout=self._config.timeout,
                check=False,
            )
        except CommandTimeout as exc:
            return CheckResult(
                gate=gate,
                status="failed",
                command=argv,
                output=exc.output[-OUTPUT_TAIL:],
                duration=exc.timeout,
                reason=f"timed out after {exc.timeout:g}s",
            )
        except CommandError as exc:
            return CheckResult(gate=gate, status="failed", command=argv, output=exc.output, reason=str(exc))
        status = "passed" if done.returncode == 0 else "failed"
        log.info("check finished", gate=gate.value, status=status, seconds=round(done.duration, 2))
        return CheckResult(
            gate=gate,
            status=status,
            command=argv,
            output=done.output[-OUTPUT_TAIL:],
            duration=done.duration,
            reason="" if status == "passed" else f"exited with {done.returncode}",
        )
