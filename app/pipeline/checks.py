"""The target repository's lint and test commands: found, run with a timeout, and compared with the base."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from app import proc
from app.errors import CommandError, CommandTimeout
from app.isolation.fence import CHECKS, SETUP, Fence
from app.logger import get_logger
from app.models import CheckResult, Gate

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

_UNSAFE = re.compile(r"[^a-z0-9-]+")


@dataclass(frozen=True)
class ChecksConfig:
    """The configured commands (None = detect from the repository) and the limits."""

    lint_command: str | None = None
    test_command: str | None = None
    setup_command: str | None = None
    timeout: float = 900
    env: Mapping[str, str] = field(default_factory=dict)
    # Where each run's check HOME goes (<homes>/<run id>/check-home); None: the HOME of `env`.
    homes: Path | None = None


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
    """Runs the setup command and the lint and test gates of the repository in a working copy, fenced."""

    def __init__(self, config: ChecksConfig, fence: Fence | None = None) -> None:
        self._config = config
        self._fence = fence

    def command_for(self, gate: Gate, repo: Path) -> list[str] | None:
        """The configured command for `gate`, else the detected one."""
        configured = self._config.lint_command if gate is Gate.LINT else self._config.test_command
        if configured:
            return shlex.split(configured)
        return detect_command(gate, repo)

    async def run(self, gate: Gate, repo: Path, run_id: str = "") -> CheckResult:
        """Run `gate` in `repo`: passed, failed with the output's tail, or skipped when no command exists."""
        argv = self.command_for(gate, repo)
        if argv is None:
            log.info("check skipped: no command", gate=gate.value)
            return CheckResult(
                gate=gate, status="skipped", reason=f"no {gate.value} command configured or found"
            )
        return await self._fenced(gate, argv, repo, run_id, CHECKS)

    async def setup(self, repo: Path, run_id: str = "") -> CheckResult:
        """Run SETUP_COMMAND in `repo` (the only phase whose allowlist holds package registries)."""
        if not self._config.setup_command:
            return CheckResult(gate=None, status="skipped", reason="no setup command configured")
        return await self._fenced(None, shlex.split(self._config.setup_command), repo, run_id, SETUP)

    def _home(self, run_id: str) -> Path:
        if self._config.homes is None:
            return Path(self._config.env.get("HOME") or Path.home())
        return self._config.homes / (_UNSAFE.sub("-", run_id.lower())[:80] or "local") / "check-home"

    async def _fenced(
        self, gate: Gate | None, argv: list[str], repo: Path, run_id: str, phase: str
    ) -> CheckResult:
        name = gate.value if gate else phase
        if (
            shutil.which(argv[0], path=self._config.env.get("PATH")) is None
            and not (repo / argv[0]).is_file()
        ):
            # Not a failure of the change, nor of the base branch: the run cannot check at all.
            reason = f"{argv[0]} is not installed (not on the PATH of the {name} command)"
            log.warning("check cannot run", gate=name, command=argv[0])
            return CheckResult(gate=gate, status="error", command=argv, reason=reason)
        if self._fence is None:
            return await self._execute(gate, argv, repo, [], dict(self._config.env))
        home = self._home(run_id)
        async with self._fence.enclose(run_id, phase, repo, home) as enclosure:
            env = {**self._config.env, "HOME": str(home), **enclosure.env}
            result = await self._execute(gate, argv, repo, enclosure.prefix, env)
        return result.model_copy(
            update={"network": enclosure.network, "canaries": enclosure.tripped, "fenced": enclosure.fenced}
        )

    async def _execute(
        self, gate: Gate | None, argv: list[str], repo: Path, prefix: list[str], env: dict[str, str]
    ) -> CheckResult:
        name = gate.value if gate else SETUP
        try:
            done = await proc.run(
                [*prefix, *argv],
                cwd=repo,
                env=env,
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
        log.info("check finished", gate=name, status=status, seconds=round(done.duration, 2))
        return CheckResult(
            gate=gate,
            status=status,
            command=argv,
            output=done.output[-OUTPUT_TAIL:],
            duration=done.duration,
            reason="" if status == "passed" else f"exited with {done.returncode}",
        )
