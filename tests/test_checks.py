"""checks: commands from settings or detected from the repository, results, and what is new against base."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import pytest

from app.models import CheckResult, Gate
from app.pipeline.checks import Checks, ChecksConfig, detect_command, failure_fingerprints, new_failures
from tests.fencing import make_fence, need_bwrap

ENV = {"PATH": os.environ["PATH"]}


def repo(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)
    return tmp_path


SCRIPTS = json.dumps({"scripts": {"lint": "eslint .", "test": "vitest run"}})


@pytest.mark.parametrize(
    ("files", "lint", "test"),
    [
        ({"package.json": SCRIPTS, "pnpm-lock.yaml": ""}, ["pnpm", "run", "lint"], ["pnpm", "run", "test"]),
        (
            {"package.json": SCRIPTS, "package-lock.json": "{}"},
            ["npm", "run", "lint"],
            ["npm", "run", "test"],
        ),
        ({"package.json": SCRIPTS, "yarn.lock": ""}, ["yarn", "run", "lint"], ["yarn", "run", "test"]),
        ({"package.json": json.dumps({"scripts": {"build": "tsc"}})}, None, None),
        (
            {"pyproject.toml": "[tool.ruff]\n[tool.pytest.ini_options]\n"},
            ["ruff", "check", "."],
            ["python", "-m", "pytest", "-q"],
        ),
        (
            {"pyproject.toml": "[project]\nname='x'\n", "tests/test_x.py": ""},
            None,
            ["python", "-m", "pytest", "-q"],
        ),
        ({"Makefile": "lint:\n\techo\ntest:\n\techo\n"}, ["make", "lint"], ["make", "test"]),
        ({"Makefile": "VAR := 1\nbuild:\n\techo\n"}, None, None),
        ({"README.md": "nothing to run"}, None, None),
    ],
)
def test_detects_the_repositorys_own_commands(
    tmp_path: Path, files: dict[str, str], lint: list[str] | None, test: list[str] | None
) -> None:
    root = repo(tmp_path, files)
    assert detect_command(Gate.LINT, root) == lint
    assert detect_command(Gate.TEST, root) == test


def test_configured_commands_win_and_are_parsed_to_argv(tmp_path: Path) -> None:
    checks = Checks(ChecksConfig(lint_command="ruff check 'src dir'", test_command="make check", env=ENV))
    root = repo(tmp_path, {"Makefile": "lint:\n\techo\n"})
    assert checks.command_for(Gate.LINT, root) == ["ruff", "check", "src dir"]
    assert checks.command_for(Gate.TEST, root) == ["make", "check"]


def run(checks: Checks, gate: Gate, root: Path) -> CheckResult:
    return asyncio.run(checks.run(gate, root))


def run_for(checks: Checks, gate: Gate, root: Path, run_id: str) -> CheckResult:
    return asyncio.run(checks.run(gate, root, run_id))


def test_no_command_is_skipped_never_passed(tmp_path: Path) -> None:
    result = run(Checks(ChecksConfig(env=ENV)), Gate.LINT, repo(tmp_path, {"README.md": "x"}))
    assert result.status == "skipped" and "no lint command" in result.reason


def test_pass_and_fail_with_the_output_tail(tmp_path: Path) -> None:
    root = repo(tmp_path, {"ok.sh": "echo fine\n", "bad.sh": "echo broken >&2; exit 3\n"})
    passed = run(Checks(ChecksConfig(lint_command="sh ok.sh", env=ENV)), Gate.LINT, root)
    assert passed.status == "passed" and "fine" in passed.output
    failed = run(Checks(ChecksConfig(test_command="sh bad.sh", env=ENV)), Gate.TEST, root)
    assert failed.status == "failed" and "broken" in failed.output and "3" in failed.reason


def test_a_missing_tool_is_an_error_not_a_failure_of_the_change(tmp_path: Path) -> None:
    result = run(Checks(ChecksConfig(lint_command="no-such-linter .", env=ENV)), Gate.LINT, tmp_path)
    assert result.status == "error"
    assert "no-such-linter is not installed" in result.reason


def test_a_check_past_its_timeout_fails_saying_so(tmp_path: Path) -> None:
    result = run(Checks(ChecksConfig(test_command="sleep 30", timeout=0.5, env=ENV)), Gate.TEST, tmp_path)
    assert result.status == "failed" and "timed out" in result.reason


def test_a_fenced_check_runs_in_the_sandbox_with_its_own_home_and_decoys(tmp_path: Path) -> None:
    fence = make_fence(tmp_path)
    root = repo(tmp_path / "workspace" / "worktrees" / "ticket" / "x-1", {"x": ""})
    homes = tmp_path / "workspace" / ".auto-code" / "agent" / "runs"
    script = (
        "import os; print(os.environ['HOME']); print(open(os.path.expanduser('~/.aws/credentials')).read())"
    )
    config = ChecksConfig(test_command=f'python3 -c "{script}"', env=ENV, homes=homes)
    result = run_for(Checks(config, fence=fence), Gate.TEST, root, "run-7")
    assert result.status == "passed", result.output
    assert result.fenced and result.network == []
    assert str(homes / "run-7" / "check-home") in result.output
    assert fence.canaries("run-7").find(result.output) == ["aws access key id", "aws secret access key"]


def test_the_setup_command_runs_in_its_own_phase(tmp_path: Path) -> None:
    fence = make_fence(tmp_path, fenced=False)
    config = ChecksConfig(setup_command="sh -c 'echo $PIP_CACHE_DIR'", env=ENV)
    result = asyncio.run(Checks(config, fence=fence).setup(tmp_path, "run-8"))
    assert result.status == "passed" and result.gate is None
    assert result.output.strip() == str(fence.config.cache_dir)
    assert asyncio.run(Checks(ChecksConfig(env=ENV)).setup(tmp_path)).status == "skipped"


PYTEST_BASE = "FAILED tests/test_a.py::test_old - assert 1 == 2\n1 failed, 3 passed"
PYTEST_BRANCH = (
    "FAILED tests/test_a.py::test_old - assert 1 == 2\nFAILED tests/test_b.py::test_new - boom\n2 failed"
)
RUFF_BASE = "app/x.py:10:5: F401 `os` imported but unused"
RUFF_BRANCH = "app/x.py:14:5: F401 `os` imported but unused\napp/y.py:3:1: E501 Line too long"


def result(output: str, status: str = "failed") -> CheckResult:
    return CheckResult(gate=Gate.TEST, status=status, command=["x"], output=output)  # type: ignore[arg-type]


def test_fingerprints_ignore_line_numbers() -> None:
    assert failure_fingerprints(RUFF_BASE) == failure_fingerprints(
        "app/x.py:99:1: F401 `os` imported but unused"
    )


def test_only_new_failures_are_fed_back() -> None:
    fresh = new_failures(result(PYTEST_BRANCH), result(PYTEST_BASE))
    assert (
        fresh is not None
        and "test_new" in fresh.split("Output:")[0]
        and "test_old" not in fresh.split("Output:")[0]
    )
    moved = new_failures(result(RUFF_BRANCH), result(RUFF_BASE))
    assert (
        moved is not None
        and "app/y.py" in moved.split("Output:")[0]
        and "app/x.py" not in moved.split("Output:")[0]
    )


def test_failures_all_present_on_base_are_not_fed_back() -> None:
    assert new_failures(result(PYTEST_BASE), result(PYTEST_BASE)) is None
    assert new_failures(result("it broke"), result("it broke too")) is None


def test_a_passing_or_missing_baseline_makes_every_failure_new() -> None:
    assert new_failures(result(PYTEST_BRANCH), result("", "passed")) == PYTEST_BRANCH
    assert new_failures(result(PYTEST_BRANCH), None) == PYTEST_BRANCH


PROBE = (
    "import glob\n"
    "read = 0\n"
    "for path in glob.glob('/proc/[0-9]*/environ'):\n"
    "    try:\n"
    "        entries = open(path, 'rb').read().decode(errors='replace').split(chr(0))\n"
    "    except OSError:\n"
    "        continue\n"
    "    read += 1\n"
    "    print('\\n'.join(e for e in entries if e.startswith('GH_TOKEN=')))\n"
    "print('environments read:', read)\n"
)


def test_a_check_running_the_agents_code_cannot_read_the_service_environment(tmp_path: Path) -> None:
    need_bwrap()
    secret = "ghp_check_secret_value_424242"
    # A stand-in for the service: a process of the same user started with the secret in its environment.
    service = subprocess.Popen(["sleep", "60"], env={**ENV, "GH_TOKEN": secret})
    try:
        workspace = tmp_path / "workspace"
        worktree = repo(workspace / "worktrees" / "ticket" / "x-1", {"probe.py": PROBE})
        config = ChecksConfig(test_command="python3 probe.py", env=ENV)
        exposed = run(Checks(config), Gate.TEST, worktree)
        isolated = run(Checks(config, fence=make_fence(tmp_path)), Gate.TEST, worktree)
    finally:
        service.kill()
        service.wait()
    assert secret in exposed.output, "without the sandbox the probe should find the secret"
    assert isolated.status == "passed" and "environments read:" in isolated.output, isolated.output
    assert secret not in isolated.output
