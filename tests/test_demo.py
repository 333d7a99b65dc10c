"""`uv run auto-code demo` from a fresh clone, with no keys and no network: the README's run command."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


def _offline_prefix() -> list[str]:
    """Run inside a fresh network namespace with only loopback up, when this machine allows it."""
    if shutil.which("unshare") and shutil.which("ip"):
        probe = subprocess.run(
            ["unshare", "-rn", "ip", "link", "set", "lo", "up"], capture_output=True, timeout=10, check=False
        )
        if probe.returncode == 0:
            return ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "offline"]
    return []


def test_demo_from_a_fresh_clone_offline_without_keys(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True, timeout=120)
    uv = shutil.which("uv")
    assert uv is not None, "the README's commands need uv on PATH"
    keep = ("PATH", "HOME", "LANG", "UV_CACHE_DIR", "XDG_CACHE_HOME")
    env = {name: os.environ[name] for name in keep if name in os.environ}
    env["UV_OFFLINE"] = "1"
    offline = _offline_prefix()
    done = subprocess.run(
        [*offline, uv, "run", "--frozen", "auto-code", "demo"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    assert "Outcome: pushed" in output
    assert "Fix rounds: 2, all on the resumed agent session" in output
    assert "ruff check ." in output and "python -m pytest -q" in output
    assert "Gates: review passed, lint passed, test passed" in output
    assert "Branch: ticket/shop-1 at " in output
    # The network record of the run: fenced where bubblewrap can make namespaces (required under CI).
    fenced = "Network: fenced; 0 requests through the egress proxy" in output
    assert fenced or "Network: UNFENCED" in output, output[-3000:]
    assert fenced or os.environ.get("CI", "").lower() not in ("1", "true", "yes"), "CI runs the demo fenced"
    progress = done.stdout.split("steps as they finish:")[1].split("Outcome:")[0]
    steps = [line.split()[0] for line in progress.splitlines() if line.strip()]
    assert steps.count("fix") == 2 and steps[-1] == "report"
    assert steps.index("fix") < steps.index("commit")
